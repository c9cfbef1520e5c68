//! The postcopy preempt channel under fuzzing: a destination whose main
//! stream has announced the channel and started the guest takes arbitrary
//! bytes on it (the hello, then what should be Pages records). It must not
//! panic, must never ask its host to touch memory outside the guest's RAM,
//! and must either keep going, pause (a hello of another migration: the
//! guest runs here, so the connection is refused by pausing) or fail with
//! a reason; the main stream's end then completes it, or it stays paused
//! or failed.

use livemig_core::destination::{DestinationEngine, HandleError, PostcopyTracking};
use livemig_core::status::MigrationStatus;
use livemig_core::time::Instant;
use livemig_core::wire::{
    self, BatchFlags, BlockList, Command, PREEMPT_HELLO_LEN, PageEntry, PageKind, PreemptHello,
    Record,
};

use crate::destination::{BoundsHost, PAGE, PAGES, layout};

/// The migration id the fuzzed main stream announces.
const MIGRATION_ID: u64 = 0x7072_6565_6d70_7421;

fn record(r: Record<'_>) -> Vec<u8> {
    let mut out = vec![0; r.encoded_len()];
    r.encode(&mut out).expect("buffer sized by encoded_len");
    out
}

/// The main stream up to the guest running on the destination, with the
/// preempt channel announced.
fn main_stream() -> Vec<u8> {
    let l = layout();
    let mut stream = vec![0u8; wire::STREAM_HEADER_LEN];
    wire::encode_stream_header(&mut stream).expect("8 bytes");
    for p in [
        record(Record::Command(Command::OpenReturnPath)),
        record(Record::Command(Command::PostcopyAdvise {
            host_page_size: 4096,
            target_page_size: 4096,
        })),
        record(Record::Command(Command::PostcopyPreempt {
            migration_id: MIGRATION_ID,
        })),
        record(Record::RamBlocks(BlockList::from_slice(&l))),
        record(Record::Command(Command::PostcopyListen)),
        record(Record::Command(Command::PostcopyRun)),
    ] {
        stream.extend_from_slice(&p);
    }
    stream
}

/// libFuzzer entry point; see [`preempt_accepts`].
pub fn preempt(data: &[u8]) {
    preempt_accepts(data);
}

/// Feeds `data[1..]` to the preempt channel in chunks sized by its first
/// byte, with page faults injected between chunks, then ends the main
/// stream; returns whether the migration completed.
pub fn preempt_accepts(data: &[u8]) -> bool {
    let Some((&seed, rest)) = data.split_first() else {
        return false;
    };
    let l = layout();
    let (mut r, mut q) = ([0u64; 1], [0u64; 1]);
    let mut tracking = [PostcopyTracking::new(&mut r, &mut q, PAGES).expect("storage fits")];
    let mut scratch = vec![0u8; 1 << 20];
    let mut preempt_scratch = vec![0u8; 1 << 20];
    let mut engine = DestinationEngine::with_postcopy(&l, &mut scratch, &mut tracking)
        .expect("matching tracking");
    engine.take_preempt(&mut preempt_scratch);
    engine
        .handle_input(Instant::ZERO, &main_stream(), &mut BoundsHost)
        .expect("a valid main stream");
    assert_eq!(engine.status(), MigrationStatus::PostcopyActive);
    let chunk = usize::from(seed % 61) + 1;
    let mut out = [0u8; 512];
    for (i, piece) in rest.chunks(chunk).enumerate() {
        let now = Instant::from_millis(i as u64);
        // Faults inside RAM only: the destination target fuzzes the rest.
        let page = u64::from(piece[0]) % PAGES;
        let _ = engine.handle_page_fault(now, 0, page);
        match engine.handle_preempt_input(now, piece, &mut BoundsHost) {
            Ok(n) => {
                assert_eq!(n, piece.len(), "all of the input is consumed");
                if engine.is_paused() {
                    assert!(
                        engine.stats().error_desc.as_str().contains("refused"),
                        "a pause for another reason: {}",
                        engine.stats().error_desc.as_str()
                    );
                    break;
                }
            }
            Err(HandleError::Dest(_)) => {
                assert_eq!(engine.status(), MigrationStatus::Failed);
                break;
            }
            Err(HandleError::Host { op, .. }) => panic!("the bounds host never fails ({op})"),
        }
        while engine.poll_return_path(&mut out) > 0 {}
    }
    let end = record(Record::EndOfStream);
    let _ = engine.handle_input(Instant::from_millis(1 << 20), &end, &mut BoundsHost);
    let state = engine.status();
    assert!(
        matches!(
            state,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::PostcopyPaused
        ),
        "ended in {state}"
    );
    if state != MigrationStatus::Completed {
        assert!(
            !engine.stats().error_desc.is_empty(),
            "a failure without a reason"
        );
    }
    state == MigrationStatus::Completed
}

/// Valid preempt channels to mutate: the hello, a requested page, a zero
/// page and the same page again (dropped).
pub fn preempt_corpus() -> Vec<Vec<u8>> {
    let mut hello = [0u8; PREEMPT_HELLO_LEN];
    PreemptHello {
        migration_id: MIGRATION_ID,
    }
    .encode(&mut hello)
    .expect("16 bytes");
    let batch = |entries: &[PageEntry]| {
        let mut out = vec![0u8; 64 + 8 * entries.len()];
        let n = wire::encode_page_batch_header(&mut out, 0, 12, BatchFlags::empty(), entries)
            .expect("small batch");
        out.truncate(n);
        for e in entries {
            if e.kind == PageKind::Normal {
                out.extend_from_slice(&[0x5a; PAGE]);
            }
        }
        out
    };
    let page = |index, kind| PageEntry { index, kind };
    let mut channel = vec![13u8];
    channel.extend_from_slice(&hello);
    channel.extend_from_slice(&batch(&[page(3, PageKind::Normal)]));
    channel.extend_from_slice(&batch(&[
        page(4, PageKind::Zero),
        page(3, PageKind::Normal),
    ]));
    let mut only_hello = vec![0u8];
    only_hello.extend_from_slice(&hello);
    vec![channel, only_hello]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_completes_and_garbage_fails_cleanly() {
        for input in preempt_corpus() {
            assert!(preempt_accepts(&input), "{input:?}");
        }
        // A main-stream header where the hello belongs.
        let mut wrong = vec![3u8];
        wrong.extend_from_slice(&main_stream()[..16]);
        assert!(!preempt_accepts(&wrong));
        // A page outside the block.
        let mut outside = preempt_corpus().remove(0);
        let at = 1 + PREEMPT_HELLO_LEN + wire::RECORD_HEADER_LEN + wire::BATCH_HEADER_LEN + 7;
        outside[at] = PAGES as u8;
        assert!(!preempt_accepts(&outside));
    }
}
