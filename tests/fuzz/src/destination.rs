//! The destination engine under fuzzing: whatever the bytes, it must not
//! panic, must never ask its host to touch memory outside the guest's RAM,
//! and must end completed or failed with a reason — never in between once
//! the input has ended.

use livemig_core::destination::{
    DestinationEngine, DestinationHost, HandleError, HostOp, PostcopyHost, PostcopyTracking,
    RequiredSection, SectionDue,
};
use livemig_core::digest::{DigestBooks, DigestKey};
use livemig_core::status::MigrationStatus;
use livemig_core::time::Instant;
use livemig_core::wire::{
    self, BatchFlags, BlockId, BlockInfo, BlockList, Command, DeviceState, PageEntry, PageKind,
    PageRange, Record,
};

/// Pages of the fuzzed guest's single block.
pub(crate) const PAGES: u64 = 64;
pub(crate) const PAGE: usize = 4096;

/// The one section the fuzzed destination requires.
const REQUIRED: &[RequiredSection] = &[RequiredSection {
    id: "cpu0",
    instance: 0,
    due: SectionDue::Switchover,
}];

/// A host that checks every request against the guest's bounds, and
/// refuses a device whose state starts with [`REFUSED_DEVICE`] (as an
/// incompatible compatibility record would be), with its own error.
pub(crate) struct BoundsHost;

/// The first byte of device state the fuzzed host refuses.
const REFUSED_DEVICE: u8 = 0xee;

/// The fuzzed host's own error.
#[derive(Debug)]
pub(crate) struct Refused;

impl core::fmt::Display for Refused {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("the fuzzed host refuses this device state")
    }
}

impl BoundsHost {
    fn check(block: u16, first: u64, count: u64) {
        assert_eq!(block, 0, "a request for a block that does not exist");
        assert!(
            first.checked_add(count).is_some_and(|end| end <= PAGES),
            "pages {first}+{count} outside a {PAGES}-page block"
        );
    }
}

impl DestinationHost for BoundsHost {
    type Error = Refused;

    fn place_pages(&mut self, block: u16, first_page: u64, data: &[u8]) -> Result<(), Self::Error> {
        assert_eq!(data.len() % PAGE, 0, "a partial page");
        Self::check(block, first_page, (data.len() / PAGE) as u64);
        Ok(())
    }
    fn place_zero_pages(
        &mut self,
        block: u16,
        first_page: u64,
        count: u64,
    ) -> Result<(), Self::Error> {
        Self::check(block, first_page, count);
        Ok(())
    }
    fn load_device(&mut self, device: &DeviceState<'_>) -> Result<(), Self::Error> {
        match device.data.first() {
            Some(&REFUSED_DEVICE) => Err(Refused),
            _ => Ok(()),
        }
    }
    fn postcopy(&mut self) -> Option<&mut dyn PostcopyHost<Error = Self::Error>> {
        Some(self)
    }
}

impl PostcopyHost for BoundsHost {
    type Error = Refused;

    fn postcopy_advise(&mut self, _host: u64, _target: u64) -> Result<(), Self::Error> {
        Ok(())
    }
    fn discard(&mut self, block: u16, range: PageRange) -> Result<(), Self::Error> {
        Self::check(block, range.first, range.count);
        Ok(())
    }
    fn postcopy_listen(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    fn postcopy_run(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    fn open_preempt(&mut self, _migration_id: u64) -> Result<(), Self::Error> {
        Ok(())
    }
}

pub(crate) fn layout() -> [BlockInfo<'static>; 1] {
    let id = BlockId::new("pc.ram").expect("valid id");
    [BlockInfo::new(id, PAGES * PAGE as u64, PAGE as u32).expect("valid block")]
}

/// libFuzzer entry point; see [`destination_accepts`].
pub fn destination(data: &[u8]) {
    destination_accepts(data);
}

/// Feeds `data` to a postcopy-capable destination in chunks sized by its
/// first byte, with page faults injected between chunks, and checks the
/// engine's contract; returns whether the stream completed.
pub fn destination_accepts(data: &[u8]) -> bool {
    let Some((&seed, rest)) = data.split_first() else {
        return false;
    };
    let l = layout();
    let (mut r, mut q) = ([0u64; 1], [0u64; 1]);
    let mut tracking = [PostcopyTracking::new(&mut r, &mut q, PAGES).expect("storage fits")];
    let mut scratch = vec![0u8; 1 << 20];
    let mut engine = DestinationEngine::with_postcopy(&l, &mut scratch, &mut tracking)
        .expect("matching tracking");
    engine.require_sections(REQUIRED).expect("one section");
    // It keeps digest books: the digest key, the Digest record and the
    // comparison are under fuzzing too.
    let mut terms = [0u64; PAGES as usize];
    let mut books = [DigestBooks::new(&l[0], &mut terms).expect("storage fits")];
    engine.verify_with(&mut books).expect("matching books");
    let chunk = usize::from(seed % 61) + 1;
    let mut out = [0u8; 512];
    for (i, piece) in rest.chunks(chunk).enumerate() {
        let now = Instant::from_millis(i as u64);
        match engine.handle_input(now, piece, &mut BoundsHost) {
            Ok(_) => {}
            Err(HandleError::Host { op, error: Refused }) => {
                // The host's own error came back, and the migration failed
                // with its words.
                assert_eq!(op, HostOp::LoadDevice);
                assert_eq!(engine.status(), MigrationStatus::Failed);
                assert!(
                    engine.stats().error_desc.as_str().contains("refuses"),
                    "{}",
                    engine.stats().error_desc
                );
                break;
            }
            Err(HandleError::Dest(_)) => break,
        }
        if engine.status() == MigrationStatus::PostcopyActive {
            let page = u64::from(piece[0]) % (PAGES + 4);
            let _ = engine.handle_page_fault(now, 0, page);
        }
        while engine.poll_return_path(&mut out) > 0 {}
    }
    let end = Instant::from_millis(u64::MAX / 2);
    let _ = engine.handle_eof(end);
    if engine.is_paused() {
        // Postcopy ran the guest here: the close paused it. No source
        // comes back, so the operator gives up, and says where pages are.
        assert!(!engine.stats().error_desc.is_empty());
        engine.give_up(end).expect("paused");
        assert!(
            engine
                .stats()
                .error_desc
                .as_str()
                .contains("exist only on the source")
        );
    }
    let state = engine.status();
    assert!(
        matches!(state, MigrationStatus::Completed | MigrationStatus::Failed),
        "ended in {state}"
    );
    if state == MigrationStatus::Failed {
        assert!(
            !engine.stats().error_desc.is_empty(),
            "a failure without a reason"
        );
    } else {
        assert_eq!(engine.ambiguous_end(), None, "a completed end is decided");
    }
    state == MigrationStatus::Completed
}

/// Valid streams for the guest above, to mutate: postcopy, and precopy
/// with the end-of-migration handshake's COMMIT.
pub fn destination_corpus() -> Vec<Vec<u8>> {
    let l = layout();
    let record = |r: Record<'_>| {
        let mut out = vec![0; r.encoded_len()];
        r.encode(&mut out).expect("buffer sized by encoded_len");
        out
    };
    let entries = [
        PageEntry {
            index: 1,
            kind: PageKind::Normal,
        },
        PageEntry {
            index: 2,
            kind: PageKind::Zero,
        },
    ];
    let mut header = vec![0u8; 64];
    let n =
        wire::encode_page_batch_header(&mut header, 0, 12, BatchFlags::END_OF_ITERATION, &entries)
            .expect("small batch");
    header.truncate(n);
    header.extend_from_slice(&[0x5a; PAGE]);
    let ranges = [PageRange { first: 1, count: 1 }];
    let cpu = record(Record::Device(DeviceState {
        id: BlockId::new("cpu0").expect("valid id"),
        instance: 0,
        version: 1,
        data: &[1, 2, 3, 4],
    }));
    let mut stream = vec![7u8, 0, 0, 0, 0, 0, 0, 0, 0];
    wire::encode_stream_header(&mut stream[1..]).expect("8 bytes");
    let parts = [
        record(Record::Command(Command::OpenReturnPath)),
        record(Record::Command(Command::PostcopyAdvise {
            host_page_size: 4096,
            target_page_size: 4096,
        })),
        record(Record::RamBlocks(BlockList::from_slice(&l))),
        header,
        record(Record::Command(Command::PostcopyRamDiscard {
            block: l[0].id,
            ranges: wire::DiscardRanges::from_slice(&ranges),
        })),
        record(Record::Command(Command::PostcopyListen)),
        cpu.clone(),
        record(Record::Command(Command::PostcopyRun)),
        record(Record::EndOfStream),
    ];
    for p in parts {
        stream.extend_from_slice(&p);
    }
    let mut short = stream.clone();
    short[0] = 0;
    let mut precopy = vec![5u8, 0, 0, 0, 0, 0, 0, 0, 0];
    wire::encode_stream_header(&mut precopy[1..]).expect("8 bytes");
    for p in [
        record(Record::Command(Command::OpenReturnPath)),
        record(Record::RamBlocks(BlockList::from_slice(&l))),
        cpu,
        record(Record::EndOfStream),
        record(Record::Command(Command::Commit)),
    ] {
        precopy.extend_from_slice(&p);
    }
    // A verified precopy: the key, one page, the digest of that page.
    let key = DigestKey::new(0x5eed);
    let term = key.page_term(0, 1, &[0x5a; PAGE]);
    let mut verified = vec![5u8, 0, 0, 0, 0, 0, 0, 0, 0];
    wire::encode_stream_header(&mut verified[1..]).expect("8 bytes");
    let mut batch = vec![0u8; 64];
    let n = wire::encode_page_batch_header(&mut batch, 0, 12, BatchFlags::empty(), &entries)
        .expect("small batch");
    batch.truncate(n);
    batch.extend_from_slice(&[0x5a; PAGE]);
    let cpu_state = record(Record::Device(DeviceState {
        id: BlockId::new("cpu0").expect("valid id"),
        instance: 0,
        version: 1,
        data: &[1, 2, 3, 4],
    }));
    for p in [
        record(Record::Command(Command::OpenReturnPath)),
        record(Record::RamBlocks(BlockList::from_slice(&l))),
        record(Record::Command(Command::DigestKey(key.seed()))),
        batch,
        cpu_state.clone(),
        record(Record::Digest(wire::BlockSums::from_slice(&[term]))),
        record(Record::EndOfStream),
        record(Record::Command(Command::Commit)),
    ] {
        verified.extend_from_slice(&p);
    }
    // A verified postcopy: after the switch the page comes with its term.
    let mut postcopy = vec![9u8, 0, 0, 0, 0, 0, 0, 0, 0];
    wire::encode_stream_header(&mut postcopy[1..]).expect("8 bytes");
    let mut with_terms = vec![0u8; 64];
    let n = wire::encode_page_batch_header_with_terms(
        &mut with_terms,
        0,
        12,
        BatchFlags::TERMS,
        &entries,
        [term].into_iter(),
    )
    .expect("small batch");
    with_terms.truncate(n);
    with_terms.extend_from_slice(&[0x5a; PAGE]);
    for p in [
        record(Record::Command(Command::OpenReturnPath)),
        record(Record::Command(Command::PostcopyAdvise {
            host_page_size: 4096,
            target_page_size: 4096,
        })),
        record(Record::RamBlocks(BlockList::from_slice(&l))),
        record(Record::Command(Command::DigestKey(key.seed()))),
        record(Record::Command(Command::PostcopyListen)),
        cpu_state.clone(),
        record(Record::Command(Command::PostcopyRun)),
        with_terms,
        record(Record::Digest(wire::BlockSums::from_slice(&[term]))),
        record(Record::EndOfStream),
    ] {
        postcopy.extend_from_slice(&p);
    }
    // A setup-time section the host refuses, before any page.
    let mut refused = vec![5u8, 0, 0, 0, 0, 0, 0, 0, 0];
    wire::encode_stream_header(&mut refused[1..]).expect("8 bytes");
    for p in [
        record(Record::Command(Command::OpenReturnPath)),
        record(Record::RamBlocks(BlockList::from_slice(&l))),
        record(Record::Device(DeviceState {
            id: BlockId::new("cpu-model").expect("valid id"),
            instance: 0,
            version: 1,
            data: &[REFUSED_DEVICE, 0, 0, 1],
        })),
        record(Record::Command(Command::Ping(1))),
        record(Record::EndOfStream),
    ] {
        refused.extend_from_slice(&p);
    }
    vec![stream, short, precopy, verified, postcopy, refused]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_completes_and_garbage_fails_cleanly() {
        let corpus = destination_corpus();
        let (refused, valid) = corpus.split_last().expect("a corpus");
        for input in valid {
            assert!(destination_accepts(input));
        }
        // The verified stream with its page flipped: the digest differs.
        let verified = &valid[valid.len() - 1];
        let mut flipped = verified.clone();
        let at = flipped.len() - 200;
        flipped[at] ^= 1;
        assert!(!destination_accepts(&flipped), "a flipped byte must fail");
        // Refused by the host, with its own error, before any page.
        assert!(!destination_accepts(refused));
        assert!(!destination_accepts(&[3, 1, 2, 3, 4, 5, 6, 7, 8, 9]));
        assert!(!destination_accepts(&[]));
    }
}
