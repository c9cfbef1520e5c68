//! The destination refuses every stream that does not fit its RAM, before
//! any write, and keeps postcopy requests to one per page.

use std::vec;
use std::vec::Vec;

use super::*;
use crate::wire::{
    BlockId, DeviceState, PageEntry, encode_page_batch_header, encode_stream_header,
};

const PAGE: usize = 4096;

/// A host that records what it was asked to do.
#[derive(Default)]
struct Recorder {
    pages: Vec<(u16, u64, usize)>,
    /// The bytes of every `place_pages`, one after another.
    bytes: Vec<u8>,
    zeros: Vec<(u16, u64, u64)>,
    postcopy: bool,
    discards: Vec<(u16, PageRange)>,
    /// The migration id of the preempt channel the engine asked to open.
    preempt: Option<u64>,
    /// SwitchoverStart commands heard.
    stops_announced: usize,
}

impl DestinationHost for Recorder {
    type Error = core::convert::Infallible;

    fn place_pages(&mut self, block: u16, first_page: u64, data: &[u8]) -> Result<(), Self::Error> {
        self.pages.push((block, first_page, data.len()));
        self.bytes.extend_from_slice(data);
        Ok(())
    }
    fn place_zero_pages(
        &mut self,
        block: u16,
        first_page: u64,
        count: u64,
    ) -> Result<(), Self::Error> {
        self.zeros.push((block, first_page, count));
        Ok(())
    }
    fn load_device(&mut self, _device: &DeviceState<'_>) -> Result<(), Self::Error> {
        Ok(())
    }
    fn postcopy(&mut self) -> Option<&mut dyn PostcopyHost<Error = Self::Error>> {
        if self.postcopy { Some(self) } else { None }
    }
    fn stop_starting(&mut self) {
        self.stops_announced += 1;
    }
}

impl PostcopyHost for Recorder {
    type Error = core::convert::Infallible;

    fn postcopy_advise(&mut self, _host: u64, _target: u64) -> Result<(), Self::Error> {
        Ok(())
    }
    fn discard(&mut self, block: u16, range: PageRange) -> Result<(), Self::Error> {
        self.discards.push((block, range));
        Ok(())
    }
    fn postcopy_listen(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    fn postcopy_run(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    fn open_preempt(&mut self, migration_id: u64) -> Result<(), Self::Error> {
        self.preempt = Some(migration_id);
        Ok(())
    }
}

/// `handle_input` with the engine's view of a failure (the recorder never
/// fails itself).
fn feed(
    d: &mut DestinationEngine<'_>,
    now: Instant,
    input: &[u8],
    host: &mut Recorder,
) -> Result<usize, DestError> {
    d.handle_input(now, input, host).map_err(|e| e.dest_error())
}

fn layout(pages: u64) -> [BlockInfo<'static>; 1] {
    [BlockInfo::new(
        BlockId::new("pc.ram").unwrap(),
        pages * PAGE as u64,
        PAGE as u32,
    )
    .unwrap()]
}

fn record(r: Record<'_>) -> Vec<u8> {
    let mut out = vec![0; r.encoded_len()];
    r.encode(&mut out).unwrap();
    out
}

fn header() -> Vec<u8> {
    let mut out = vec![0; 8];
    encode_stream_header(&mut out).unwrap();
    out
}

fn blocks(l: &[BlockInfo<'_>]) -> Vec<u8> {
    record(Record::RamBlocks(BlockList::from_slice(l)))
}

fn batch(block: u16, pages: &[(u64, bool)]) -> Vec<u8> {
    let entries: Vec<PageEntry> = pages
        .iter()
        .map(|&(index, zero)| PageEntry {
            index,
            kind: if zero {
                PageKind::Zero
            } else {
                PageKind::Normal
            },
        })
        .collect();
    let mut out = vec![0; 64 + 8 * entries.len()];
    let n = encode_page_batch_header(&mut out, block, 12, BatchFlags::empty(), &entries).unwrap();
    out.truncate(n);
    for (_, zero) in pages {
        if !zero {
            out.extend_from_slice(&[0xab; PAGE]);
        }
    }
    out
}

fn run(
    l: &[BlockInfo<'_>],
    stream: &[u8],
    host: &mut Recorder,
) -> Result<MigrationStatus, DestError> {
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(l, &mut scratch);
    feed(&mut d, Instant::ZERO, stream, host)?;
    Ok(d.status())
}

#[test]
fn a_clean_stream_places_pages_and_completes() {
    let l = layout(16);
    let stream = [
        header(),
        blocks(&l),
        batch(0, &[(1, false), (2, true), (3, true), (9, false)]),
        record(Record::EndOfStream),
    ]
    .concat();
    let mut host = Recorder::default();
    assert_eq!(run(&l, &stream, &mut host), Ok(MigrationStatus::Completed));
    assert_eq!(host.pages, [(0, 1, PAGE), (0, 9, PAGE)]);
    assert_eq!(host.zeros, [(0, 2, 2)], "a run of zero pages is one call");
}

/// Consecutive normal pages go to the host as one call, at most
/// `NormalRun::MAX_PAGES` of them, with their bytes in stream order; a zero
/// page or a gap ends a run, and pages keep their order around it.
#[test]
fn runs_of_normal_pages_are_placed_in_one_call_each() {
    let l = layout(64);
    let mut pages: Vec<(u64, bool)> = vec![(0, false), (1, false), (2, false), (3, true)];
    pages.extend((4..24).map(|p| (p, false)));
    pages.extend([(30, false), (31, true), (32, true), (40, false)]);
    let mut encoded = batch(0, &pages);
    // Each normal page's bytes name it, so a page placed under another's
    // index, or bytes out of order, show.
    let mut data_at = encoded.len() - PAGE * pages.iter().filter(|p| !p.1).count();
    let mut expected = Vec::new();
    for &(index, zero) in &pages {
        if !zero {
            encoded[data_at..data_at + PAGE].fill(index as u8);
            expected.extend_from_slice(&[index as u8; PAGE]);
            data_at += PAGE;
        }
    }
    let stream = [header(), blocks(&l), encoded, record(Record::EndOfStream)].concat();
    let mut host = Recorder::default();
    assert_eq!(run(&l, &stream, &mut host), Ok(MigrationStatus::Completed));
    assert_eq!(
        host.pages,
        [
            (0, 0, 3 * PAGE),
            (0, 4, 16 * PAGE),
            (0, 20, 4 * PAGE),
            (0, 30, PAGE),
            (0, 40, PAGE),
        ]
    );
    assert_eq!(host.zeros, [(0, 3, 1), (0, 31, 2)]);
    assert!(host.bytes == expected, "the runs' bytes are the pages' own");
}

fn zero_run(block: u16, page_shift: u8, first: u64, count: u64) -> Vec<u8> {
    record(Record::ZeroRun(ZeroRun {
        block,
        page_shift,
        range: PageRange { first, count },
    }))
}

/// A ZeroRun is placed as the same pages in ZERO entries: one host call,
/// counted as duplicates; one that leaves its block, names another
/// block, disagrees on the page size or comes before the block list is
/// refused by name before any page is placed.
#[test]
fn a_zero_run_is_placed_as_zero_entries_and_checked_first() {
    let l = layout(16);
    let stream = [
        header(),
        blocks(&l),
        batch(0, &[(1, false)]),
        zero_run(0, 12, 0, 16),
        record(Record::EndOfStream),
    ]
    .concat();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    let mut host = Recorder::default();
    feed(&mut d, Instant::ZERO, &stream, &mut host).unwrap();
    assert_eq!(d.status(), MigrationStatus::Completed);
    assert_eq!(
        host.zeros,
        [(0, 0, 16)],
        "page 1 is zeroed too, by the host"
    );
    assert_eq!(d.stats().ram.duplicate, 16);

    let refused = [
        (
            zero_run(0, 12, 10, 7),
            DestError::PageOutOfBlock {
                block: 0,
                page: 16,
                pages: 16,
            },
        ),
        (
            zero_run(2, 12, 0, 1),
            DestError::NoSuchBlock {
                block: 2,
                blocks: 1,
            },
        ),
        (
            zero_run(0, 13, 0, 1),
            DestError::PageSizeMismatch {
                index: 0,
                source: 8192,
                destination: 4096,
            },
        ),
    ];
    for (bad, error) in refused {
        let mut host = Recorder::default();
        let stream = [header(), blocks(&l), bad].concat();
        assert_eq!(run(&l, &stream, &mut host), Err(error));
        assert!(host.zeros.is_empty());
    }
    let mut host = Recorder::default();
    let stream = [header(), zero_run(0, 12, 0, 1)].concat();
    assert_eq!(
        run(&l, &stream, &mut host),
        Err(DestError::PagesBeforeBlockList)
    );
}

/// In postcopy a ZeroRun skips the pages already placed (a request's
/// answer came first), as a batch's ZERO entries do: the rest in as few
/// calls as the skips allow.
#[test]
fn a_postcopy_zero_run_skips_pages_placed_already() {
    let l = layout(16);
    with_postcopy_engine(&l, false, |d| {
        let mut host = postcopy_host();
        feed(d, Instant::ZERO, &postcopy_stream(&l, &[], &[]), &mut host).unwrap();
        assert_eq!(d.status(), MigrationStatus::PostcopyActive);
        feed(
            d,
            Instant::ZERO,
            &batch(0, &[(3, false), (4, false), (9, false)]),
            &mut host,
        )
        .unwrap();
        feed(d, Instant::ZERO, &zero_run(0, 12, 2, 12), &mut host).unwrap();
        assert_eq!(host.zeros, [(0, 2, 1), (0, 5, 4), (0, 10, 4)]);
        assert!((2..14).all(|p| d.is_received(0, p)));
        assert!(!d.is_received(0, 14));
    });
}

#[test]
fn layout_mismatches_are_named() {
    let ours = layout(16);
    let bigger = layout(32);
    let mut host = Recorder::default();
    let stream = [header(), blocks(&bigger)].concat();
    assert_eq!(
        run(&ours, &stream, &mut host),
        Err(DestError::BlockLengthMismatch {
            index: 0,
            source: 32 * 4096,
            destination: 16 * 4096
        })
    );
    let other = [BlockInfo::new(BlockId::new("vga.ram").unwrap(), 16 * 4096, 4096).unwrap()];
    let stream = [header(), blocks(&other)].concat();
    assert_eq!(
        run(&ours, &stream, &mut host),
        Err(DestError::BlockIdMismatch { index: 0 })
    );
    let two = [ours[0], other[0]];
    let stream = [header(), blocks(&two)].concat();
    assert_eq!(
        run(&ours, &stream, &mut host),
        Err(DestError::BlockCountMismatch {
            source: 2,
            destination: 1
        })
    );
    let stream = [header(), blocks(&ours), blocks(&ours)].concat();
    assert_eq!(
        run(&ours, &stream, &mut host),
        Err(DestError::DuplicateBlockList)
    );
}

#[test]
fn pages_outside_ram_are_refused_before_any_write() {
    let l = layout(16);
    let mut host = Recorder::default();
    let stream = [header(), batch(0, &[(1, false)])].concat();
    assert_eq!(
        run(&l, &stream, &mut host),
        Err(DestError::PagesBeforeBlockList)
    );
    let stream = [header(), blocks(&l), batch(0, &[(1, false), (16, false)])].concat();
    assert_eq!(
        run(&l, &stream, &mut host),
        Err(DestError::PageOutOfBlock {
            block: 0,
            page: 16,
            pages: 16
        })
    );
    assert!(
        host.pages.is_empty(),
        "the valid page of a bad batch is not placed either"
    );
    let stream = [header(), blocks(&l), batch(3, &[(1, false)])].concat();
    assert_eq!(
        run(&l, &stream, &mut host),
        Err(DestError::NoSuchBlock {
            block: 3,
            blocks: 1
        })
    );
}

#[test]
fn failure_queues_shut_with_an_error_and_sticks() {
    let l = layout(16);
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    let mut host = Recorder::default();
    let stream = [
        header(),
        record(Record::Command(Command::OpenReturnPath)),
        blocks(&layout(8)),
    ]
    .concat();
    assert!(feed(&mut d, Instant::ZERO, &stream, &mut host).is_err());
    let mut out = [0u8; 16];
    assert_eq!(d.poll_return_path(&mut out), 8);
    assert_eq!(
        out[..8],
        [0, 1, 0, 4, 0, 0, 0, 1],
        "SHUT(1), and no switchover approval"
    );
    assert_eq!(
        feed(&mut d, Instant::ZERO, &[0], &mut host),
        Err(DestError::AlreadyFailed)
    );
    assert!(d.stats().error_desc.as_str().contains("RAM size mismatch"));
}

#[test]
fn a_connection_closed_mid_record_fails_and_a_silent_one_times_out() {
    let l = layout(16);
    let mut host = Recorder::default();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    let stream = [header(), blocks(&l)].concat();
    feed(
        &mut d,
        Instant::ZERO,
        &stream[..stream.len() - 3],
        &mut host,
    )
    .unwrap();
    assert!(matches!(
        d.handle_eof(Instant::ZERO),
        Err(DestError::UnexpectedEof(_))
    ));

    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    d.set_idle_timeout(Duration::from_millis(100));
    feed(&mut d, Instant::ZERO, &header(), &mut host).unwrap();
    assert_eq!(d.poll_timeout(), Some(Instant::from_millis(100)));
    assert_eq!(d.handle_timeout(Instant::from_millis(99)), Ok(()));
    assert_eq!(
        d.handle_timeout(Instant::from_millis(100)),
        Err(DestError::SourceSilent { idle_ms: 100 })
    );
}

/// A host that takes postcopy.
fn postcopy_host() -> Recorder {
    Recorder {
        postcopy: true,
        ..Recorder::default()
    }
}

/// A postcopy stream up to the guest running here: the stream header,
/// the return path, the advise, `setup` (what comes before the blocks),
/// the blocks of `l`, `precopy` (what the precopy sent), the listen and
/// the run.
fn postcopy_stream(l: &[BlockInfo<'_>], setup: &[Vec<u8>], precopy: &[Vec<u8>]) -> Vec<u8> {
    [
        header(),
        record(Record::Command(Command::OpenReturnPath)),
        record(Record::Command(Command::PostcopyAdvise {
            host_page_size: 4096,
            target_page_size: 4096,
        })),
    ]
    .into_iter()
    .chain(setup.iter().cloned())
    .chain([blocks(l)])
    .chain(precopy.iter().cloned())
    .chain([
        record(Record::Command(Command::PostcopyListen)),
        record(Record::Command(Command::PostcopyRun)),
    ])
    .collect::<Vec<_>>()
    .concat()
}

#[test]
fn a_destination_without_postcopy_refuses_the_advise_at_once() {
    let l = layout(16);
    let advise = record(Record::Command(Command::PostcopyAdvise {
        host_page_size: 4096,
        target_page_size: 4096,
    }));
    let stream = [header(), advise].concat();
    let mut host = Recorder::default();
    assert_eq!(
        run(&l, &stream, &mut host),
        Err(DestError::PostcopyUnsupported)
    );
}

#[test]
fn postcopy_requests_each_missing_page_once_and_times_out() {
    let l = layout(16);
    let mut host = postcopy_host();
    let ranges = [PageRange { first: 4, count: 2 }];
    let stream = postcopy_stream(
        &l,
        &[],
        &[
            batch(0, &[(4, false), (5, false), (6, false)]),
            record(Record::Command(Command::PostcopyRamDiscard {
                block: l[0].id,
                ranges: crate::wire::DiscardRanges::from_slice(&ranges),
            })),
        ],
    );
    let t = Instant::from_millis(1);
    with_postcopy_engine(&l, false, |d| {
        d.set_request_timeout(Duration::from_millis(50));
        feed(d, Instant::ZERO, &stream, &mut host).unwrap();
        assert_eq!(d.status(), MigrationStatus::PostcopyActive);
        assert_eq!(host.discards, [(0, ranges[0])]);
        assert!(!d.is_received(0, 4) && !d.is_received(0, 5) && d.is_received(0, 6));
        assert_eq!(d.handle_page_fault(t, 0, 6), Ok(false), "already here");
        assert_eq!(d.handle_page_fault(t, 0, 4), Ok(true));
        assert_eq!(d.handle_page_fault(t, 0, 4), Ok(false), "already requested");
        assert_eq!(d.handle_page_fault(t, 0, 5), Ok(true));
        assert_eq!(d.outstanding_requests(), 2);
        let mut out = [0u8; 64];
        let n = d.poll_return_path(&mut out);
        // The switchover approval sent after the block list, then REQ_PAGES_ID
        // for page 4 of "pc.ram", then REQ_PAGES for page 5.
        assert_eq!(n, 4 + (4 + 13 + 6) + (4 + 12));
        assert_eq!(out[..4], [0, 7, 0, 0]);
        assert_eq!(out[4..8], [0, 3, 0, 19]);
        assert_eq!(out[27..31], [0, 4, 0, 12]);
        assert_eq!(
            d.handle_page_fault(t, 0, 16),
            Err(DestError::FaultOutsideRam { block: 0, page: 16 })
        );
    });

    // Page 4 arrives; page 5 never does.
    with_postcopy_engine(&l, false, |d| {
        d.set_request_timeout(Duration::from_millis(50));
        feed(d, Instant::ZERO, &stream, &mut host).unwrap();
        d.handle_page_fault(t, 0, 4).unwrap();
        d.handle_page_fault(t, 0, 5).unwrap();
        feed(
            d,
            Instant::from_millis(20),
            &batch(0, &[(4, false)]),
            &mut host,
        )
        .unwrap();
        assert_eq!(d.outstanding_requests(), 1);
        assert_eq!(
            d.poll_timeout(),
            Some(Instant::from_millis(70)),
            "the clock restarts when a page arrives"
        );
        assert_eq!(
            d.handle_timeout(Instant::from_millis(70)),
            Err(DestError::RequestTimedOut {
                outstanding: 1,
                waited_ms: 50
            })
        );
    });
}

/// A fault thread that writes its own requests: the engine books them
/// without queueing a second copy, and from then on names the block in
/// every request it queues itself (the host's requests come in between).
#[test]
fn requests_the_host_wrote_are_booked_not_queued_and_named_after() {
    let l = layout(16);
    let t = Instant::from_millis(1);
    with_postcopy_engine(&l, false, |d| {
        assert_eq!(
            d.handle_page_fault_sent(t, 0, 4),
            Err(DestError::PostcopyUnexpected("page fault outside postcopy")),
            "no request before postcopy"
        );
    });
    let mut host = postcopy_host();
    with_postcopy_engine(&l, false, |d| {
        d.set_request_timeout(Duration::from_millis(50));
        let stream = postcopy_stream(&l, &[], &[batch(0, &[(6, false)])]);
        feed(d, Instant::ZERO, &stream, &mut host).unwrap();
        let mut out = [0u8; 64];
        // The switchover approval.
        assert_eq!(d.poll_return_path(&mut out), 4);
        d.set_host_requests();
        assert_eq!(d.handle_page_fault_sent(t, 0, 4), Ok(true));
        assert_eq!(d.handle_page_fault_sent(t, 0, 4), Ok(false), "requested");
        assert_eq!(d.handle_page_fault_sent(t, 0, 6), Ok(false), "already here");
        assert_eq!(d.poll_return_path(&mut out), 0, "nothing queued for them");
        assert_eq!(d.outstanding_requests(), 1);
        assert_eq!(
            d.stats().ram.postcopy_requests,
            3,
            "each one the source saw"
        );
        assert_eq!(d.poll_timeout(), Some(Instant::from_millis(51)), "awaited");
        // Two requests of the engine's own, same block: both REQ_PAGES_ID.
        assert_eq!(d.handle_page_fault(t, 0, 5), Ok(true));
        assert_eq!(d.handle_page_fault(t, 0, 7), Ok(true));
        assert_eq!(d.poll_return_path(&mut out), 2 * (4 + 13 + 6));
        assert_eq!(out[..4], [0, 3, 0, 19]);
        assert_eq!(out[23..27], [0, 3, 0, 19]);
        // The host's page 4 arrives and answers its request.
        feed(d, t, &batch(0, &[(4, false)]), &mut host).unwrap();
        assert_eq!(d.outstanding_requests(), 2);
        assert_eq!(
            d.handle_page_fault_sent(t, 0, 16),
            Err(DestError::FaultOutsideRam { block: 0, page: 16 })
        );
    });
}

#[test]
fn a_connection_closed_before_the_first_byte_fails() {
    let l = layout(16);
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    assert!(matches!(
        d.handle_eof(Instant::ZERO),
        Err(DestError::UnexpectedEof(_))
    ));
    assert_eq!(d.status(), MigrationStatus::Failed);
    assert!(!d.stats().error_desc.is_empty());
}

#[test]
fn a_peer_that_never_sends_is_given_up_on() {
    let l = layout(16);
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    assert_eq!(
        d.poll_timeout(),
        None,
        "no clock before the connection is up"
    );
    d.set_idle_timeout(Duration::from_millis(100));
    d.begin(Instant::from_millis(5));
    assert_eq!(d.poll_timeout(), Some(Instant::from_millis(105)));
    assert_eq!(
        d.handle_timeout(Instant::from_millis(105)),
        Err(DestError::SourceSilent { idle_ms: 100 })
    );
    assert_eq!(d.status(), MigrationStatus::Failed);
}

#[test]
fn completion_reports_the_average_throughput() {
    let l = layout(16);
    let stream = [
        header(),
        blocks(&l),
        batch(0, &[(1, false)]),
        record(Record::EndOfStream),
    ]
    .concat();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    let mut host = Recorder::default();
    d.begin(Instant::ZERO);
    feed(&mut d, Instant::from_millis(10), &stream, &mut host).unwrap();
    assert!(d.is_completed());
    let expected = stream.len() as f64 * 8.0 / 10.0 / 1000.0;
    assert!(
        (d.stats().ram.mbps - expected).abs() < 1e-9,
        "{}",
        d.stats().ram.mbps
    );
}

const CPU: &[RequiredSection] = &[RequiredSection {
    id: "cpu0",
    instance: 0,
    due: SectionDue::Switchover,
}];

fn device(id: &str, instance: u32) -> Vec<u8> {
    record(Record::Device(DeviceState {
        id: BlockId::new(id).unwrap(),
        instance,
        version: 1,
        data: &[1, 2, 3],
    }))
}

/// Drains the return path into a vector.
fn drained(d: &mut DestinationEngine<'_>) -> Vec<u8> {
    let mut out = [0u8; 256];
    let n = d.poll_return_path(&mut out);
    out[..n].to_vec()
}

const LOADED: [u8; 4] = [1, 0, 0, 0];
const SHUT_OK: [u8; 8] = [0, 1, 0, 4, 0, 0, 0, 0];
const SHUT_ERR: [u8; 8] = [0, 1, 0, 4, 0, 0, 0, 1];

#[test]
fn a_stream_without_a_required_section_is_refused_by_name() {
    let l = layout(16);
    let mut host = Recorder::default();
    let stream = [header(), blocks(&l), record(Record::EndOfStream)].concat();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    d.require_sections(CPU).unwrap();
    let err = feed(&mut d, Instant::ZERO, &stream, &mut host);
    assert_eq!(
        err,
        Err(DestError::MissingSection {
            id: "cpu0",
            instance: 0
        })
    );
    assert!(!d.is_completed());
    assert_eq!(
        d.ambiguous_end(),
        None,
        "a clean failure: discard this copy"
    );
    assert!(d.stats().error_desc.as_str().contains("'cpu0' instance 0"));
    // Another instance of the same device is not the one required.
    let stream = [
        header(),
        blocks(&l),
        device("cpu0", 1),
        record(Record::EndOfStream),
    ]
    .concat();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    d.require_sections(CPU).unwrap();
    assert!(matches!(
        feed(&mut d, Instant::ZERO, &stream, &mut host),
        Err(DestError::MissingSection { .. })
    ));
    // With it, the same stream completes.
    let stream = [
        header(),
        blocks(&l),
        device("cpu0", 0),
        record(Record::EndOfStream),
    ]
    .concat();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    d.require_sections(CPU).unwrap();
    feed(&mut d, Instant::ZERO, &stream, &mut host).unwrap();
    assert!(d.is_completed());
    static MANY: [RequiredSection; MAX_REQUIRED_SECTIONS + 1] = [RequiredSection {
        id: "x",
        instance: 0,
        due: SectionDue::Switchover,
    }; MAX_REQUIRED_SECTIONS + 1];
    assert_eq!(
        d.require_sections(&MANY),
        Err(DestError::TooManyRequiredSections { count: 65 })
    );
}

#[test]
fn a_repeated_required_section_is_refused_by_name() {
    let l = layout(16);
    let mut host = Recorder::default();
    let stream = [
        header(),
        blocks(&l),
        device("cpu0", 0),
        device("cpu0", 0),
        record(Record::EndOfStream),
    ]
    .concat();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    d.require_sections(CPU).unwrap();
    assert_eq!(
        feed(&mut d, Instant::ZERO, &stream, &mut host),
        Err(DestError::RepeatedSection {
            id: "cpu0",
            instance: 0
        })
    );
    assert!(!d.is_completed());
    assert!(d.stats().error_desc.as_str().contains("twice"));
}

#[test]
fn the_setup_check_is_refused_without_a_section_due_by_then() {
    const SETUP: &[RequiredSection] = &[
        RequiredSection {
            id: "cpu-model",
            instance: 0,
            due: SectionDue::SetupCheck,
        },
        RequiredSection {
            id: "cpu0",
            instance: 0,
            due: SectionDue::Switchover,
        },
    ];
    let l = layout(16);
    let mut host = Recorder::default();
    let ping = record(Record::Command(Command::Ping(SETUP_CHECK_PING)));
    let open = record(Record::Command(Command::OpenReturnPath));
    // The setup section missing: the check itself is refused, no PONG.
    let stream = [header(), open.clone(), blocks(&l), ping.clone()].concat();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    d.require_sections(SETUP).unwrap();
    assert_eq!(
        feed(&mut d, Instant::ZERO, &stream, &mut host),
        Err(DestError::MissingSection {
            id: "cpu-model",
            instance: 0
        })
    );
    // With it, the check passes although the switchover's section has not
    // come yet (it comes with the stopped guest), and the PONG is queued.
    let stream = [header(), open, blocks(&l), device("cpu-model", 0), ping].concat();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    d.require_sections(SETUP).unwrap();
    feed(&mut d, Instant::ZERO, &stream, &mut host).unwrap();
    let pong = drained(&mut d);
    let mut expected = [0u8; 64];
    let n = RpMessage::Pong(SETUP_CHECK_PING)
        .encode(&mut expected)
        .unwrap();
    assert!(pong.ends_with(&expected[..n]), "the PONG follows: {pong:?}");
}

#[test]
fn bytes_after_the_end_in_the_same_input_are_refused_before_completion() {
    let l = layout(16);
    let mut host = Recorder::default();
    let end = [header(), blocks(&l), record(Record::EndOfStream)].concat();
    for garbage in [&[0xffu8][..], &[0, 6, 0, 0, 0, 0, 0, 0]] {
        let mut scratch = vec![0; 1 << 20];
        let mut d = DestinationEngine::new(&l, &mut scratch);
        let stream = [&end[..], garbage].concat();
        assert!(matches!(
            feed(&mut d, Instant::ZERO, &stream, &mut host),
            Err(DestError::Decode(DecodeError::TrailingData {
                what: "after EndOfStream",
                ..
            }))
        ));
        assert_eq!(d.status(), MigrationStatus::Failed, "never completed");
    }
    // Once completed, later bytes are reported and change nothing.
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    feed(&mut d, Instant::ZERO, &end, &mut host).unwrap();
    assert!(d.is_completed());
    assert!(matches!(
        feed(&mut d, Instant::ZERO, &[0xff], &mut host),
        Err(DestError::Decode(DecodeError::TrailingData { .. }))
    ));
    assert!(d.is_completed());
}

/// With the return path: END_OF_STREAM gives LOADED, not completion; the
/// COMMIT completes and is confirmed with SHUT(0).
#[test]
fn the_end_is_loaded_then_committed() {
    let l = layout(16);
    let mut host = Recorder::default();
    let end = [
        header(),
        record(Record::Command(Command::OpenReturnPath)),
        blocks(&l),
        device("cpu0", 0),
        record(Record::EndOfStream),
    ]
    .concat();
    let commit = record(Record::Command(Command::Commit));
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    d.require_sections(CPU).unwrap();
    feed(&mut d, Instant::ZERO, &end, &mut host).unwrap();
    assert!(d.is_loaded() && !d.is_completed());
    // The switchover approval, then LOADED.
    assert_eq!(drained(&mut d), [&[0, 7, 0, 0][..], &LOADED].concat());
    feed(&mut d, Instant::ZERO, &commit[..3], &mut host).unwrap();
    assert!(!d.is_completed(), "a partial COMMIT is not a commit");
    feed(&mut d, Instant::ZERO, &commit[3..], &mut host).unwrap();
    assert!(d.is_completed() && !d.is_loaded());
    assert_eq!(drained(&mut d), SHUT_OK);
    assert_eq!(d.handle_eof(Instant::ZERO), Ok(()));

    // COMMIT followed by garbage in one read: refused, the guest stays
    // paused, and since the source committed, the end is ambiguous.
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    feed(&mut d, Instant::ZERO, &end, &mut host).unwrap();
    drained(&mut d);
    let stream = [&commit[..], &[0]].concat();
    assert!(matches!(
        feed(&mut d, Instant::ZERO, &stream, &mut host),
        Err(DestError::Decode(DecodeError::TrailingData {
            what: "after Commit",
            len: 1
        }))
    ));
    assert!(!d.is_completed());
    assert_eq!(d.ambiguous_end(), Some(AmbiguousEnd::DestinationLoaded));
    assert_eq!(drained(&mut d), SHUT_ERR);
}

#[test]
fn a_loaded_destination_that_gets_no_commit_is_ambiguous() {
    let l = layout(16);
    let mut host = Recorder::default();
    let end = [
        header(),
        record(Record::Command(Command::OpenReturnPath)),
        blocks(&l),
        record(Record::EndOfStream),
    ]
    .concat();
    // The connection closes.
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    feed(&mut d, Instant::ZERO, &end, &mut host).unwrap();
    assert_eq!(
        d.handle_eof(Instant::ZERO),
        Err(DestError::CommitNotReceived)
    );
    assert_eq!(d.ambiguous_end(), Some(AmbiguousEnd::DestinationLoaded));
    assert_eq!(d.status(), MigrationStatus::Failed);
    // The source falls silent.
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    d.set_idle_timeout(Duration::from_millis(100));
    feed(&mut d, Instant::ZERO, &end, &mut host).unwrap();
    let late = Instant::ZERO + Duration::from_millis(100);
    assert_eq!(d.poll_timeout(), Some(late));
    assert!(matches!(
        d.handle_timeout(late),
        Err(DestError::SourceSilent { .. })
    ));
    assert_eq!(d.ambiguous_end(), Some(AmbiguousEnd::DestinationLoaded));
    // The connection closes in the middle of the COMMIT.
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    feed(&mut d, Instant::ZERO, &end, &mut host).unwrap();
    let commit = record(Record::Command(Command::Commit));
    feed(&mut d, Instant::ZERO, &commit[..9], &mut host).unwrap();
    assert!(matches!(
        d.handle_eof(Instant::ZERO),
        Err(DestError::UnexpectedEof(_))
    ));
    assert_eq!(d.ambiguous_end(), Some(AmbiguousEnd::DestinationLoaded));
    // A failure before LOADED was queued is clean: the end of the stream
    // and garbage in one read.
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    let stream = [&end[..], &[0xff]].concat();
    assert!(feed(&mut d, Instant::ZERO, &stream, &mut host).is_err());
    assert_eq!(d.ambiguous_end(), None);
    let rp = drained(&mut d);
    assert!(!rp.windows(4).any(|w| w == LOADED), "no LOADED went out");
    // A COMMIT before the end of the stream is refused.
    let early = [
        header(),
        record(Record::Command(Command::OpenReturnPath)),
        blocks(&l),
        record(Record::Command(Command::Commit)),
    ]
    .concat();
    assert_eq!(
        run(&l, &early, &mut host),
        Err(DestError::UnexpectedCommand(
            "commit before the stream was loaded"
        ))
    );
}

/// Between LOADED and COMMIT the source may already have committed: an
/// interrupt then is refused and changes nothing (failing would leave the
/// guest running nowhere), and the COMMIT still completes.
#[test]
fn an_interrupt_after_loaded_is_refused() {
    let l = layout(16);
    let mut host = Recorder::default();
    let end = [
        header(),
        record(Record::Command(Command::OpenReturnPath)),
        blocks(&l),
        record(Record::EndOfStream),
    ]
    .concat();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    feed(&mut d, Instant::ZERO, &end, &mut host).unwrap();
    assert!(d.is_loaded());
    drained(&mut d);
    assert_eq!(
        d.interrupt(Instant::ZERO, 2),
        Err(DestError::InterruptAfterLoaded)
    );
    assert!(d.is_loaded());
    assert!(drained(&mut d).is_empty(), "no INTERRUPTED went out");
    let commit = record(Record::Command(Command::Commit));
    feed(&mut d, Instant::ZERO, &commit, &mut host).unwrap();
    assert!(d.is_completed());
}

/// Issue 8 item 7: an interrupted destination stops loading and tells the
/// source why with INTERRUPTED (not a bare error SHUT); once the guest runs
/// here (postcopy) the interrupt is refused and changes nothing.
#[test]
fn an_interrupt_fails_the_load_and_says_so_but_not_once_the_guest_runs_here() {
    let l = layout(16);
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    let mut host = Recorder::default();
    let stream = [
        header(),
        record(Record::Command(Command::OpenReturnPath)),
        blocks(&l),
    ]
    .concat();
    feed(&mut d, Instant::ZERO, &stream, &mut host).unwrap();
    let mut out = [0u8; 32];
    let n = d.poll_return_path(&mut out);
    assert_eq!(out[..n], [0, 7, 0, 0], "switchover approval only");
    assert_eq!(d.interrupt(Instant::ZERO, 15), Ok(true));
    assert_eq!(d.status(), MigrationStatus::Failed);
    let n = d.poll_return_path(&mut out);
    assert_eq!(out[..n], [1, 1, 0, 4, 0, 0, 0, 15], "INTERRUPTED(SIGTERM)");
    assert_eq!(
        d.stats().error_desc.as_str(),
        "interrupted by SIGTERM: the destination stopped loading the stream"
    );
    assert_eq!(
        feed(&mut d, Instant::ZERO, &batch(0, &[(1, false)]), &mut host),
        Err(DestError::AlreadyFailed)
    );
    assert_eq!(d.interrupt(Instant::ZERO, 2), Err(DestError::AlreadyFailed));

    // Postcopy: after the run command the guest is this side's to keep.
    with_postcopy_engine(&l, false, |d| {
        let mut host = postcopy_host();
        let stream = postcopy_stream(&l, &[], &[]);
        feed(d, Instant::ZERO, &stream, &mut host).unwrap();
        let _ = d.poll_return_path(&mut out);
        assert_eq!(
            d.interrupt(Instant::ZERO, 2),
            Err(DestError::PostcopyCannotBeInterrupted)
        );
        assert_eq!(d.status(), MigrationStatus::PostcopyActive);
        assert_eq!(d.poll_return_path(&mut out), 0, "nothing sent");
        feed(d, Instant::ZERO, &record(Record::EndOfStream), &mut host).unwrap();
        assert!(d.is_completed());
        // After the end there is nothing left to interrupt.
        assert_eq!(d.interrupt(Instant::ZERO, 2), Ok(false));
        assert!(d.is_completed());
    });
}

/// A host whose device loads fail with its own error type.
struct Refuser;

#[derive(Debug, PartialEq, Eq)]
struct Incompatible {
    cpuid_leaf: u32,
}

impl fmt::Display for Incompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CPUID leaf {:#x} differs", self.cpuid_leaf)
    }
}

impl DestinationHost for Refuser {
    type Error = Incompatible;

    fn place_pages(&mut self, _: u16, _: u64, _: &[u8]) -> Result<(), Incompatible> {
        panic!("no page may be placed after a refused setup section")
    }
    fn place_zero_pages(&mut self, _: u16, _: u64, _: u64) -> Result<(), Incompatible> {
        panic!("no page may be placed after a refused setup section")
    }
    fn load_device(&mut self, _device: &DeviceState<'_>) -> Result<(), Incompatible> {
        Err(Incompatible { cpuid_leaf: 7 })
    }
}

/// A setup-time section the host refuses (the compatibility record):
/// the host's own error comes back to the caller, the migration fails
/// with it in its description, and the source hears SHUT(1) instead of
/// the PONG to its setup check, before any page.
#[test]
fn a_refused_setup_section_hands_back_the_host_error_before_any_ram() {
    let l = layout(16);
    let device = record(Record::Device(DeviceState {
        id: crate::wire::DeviceId::new("cpu-model").unwrap(),
        instance: 0,
        version: 1,
        data: &[1, 2, 3, 4],
    }));
    let stream = [
        header(),
        record(Record::Command(Command::OpenReturnPath)),
        blocks(&l),
        device,
        record(Record::Command(Command::Ping(1))),
        batch(0, &[(1, false)]),
    ]
    .concat();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    let err = d.handle_input(Instant::ZERO, &stream, &mut Refuser);
    assert_eq!(
        err,
        Err(HandleError::Host {
            op: HostOp::LoadDevice,
            error: Incompatible { cpuid_leaf: 7 }
        })
    );
    assert_eq!(
        err.unwrap_err().dest_error(),
        DestError::Host(HostOp::LoadDevice)
    );
    assert_eq!(d.status(), MigrationStatus::Failed);
    assert_eq!(
        d.stats().error_desc.as_str(),
        "the VMM failed loading device state: CPUID leaf 0x7 differs"
    );
    let mut rp = [0u8; 64];
    let n = d.poll_return_path(&mut rp);
    // SWITCHOVER_ACK for the block list, then SHUT(1); no PONG.
    let mut expected = [0u8; 64];
    let a = RpMessage::SwitchoverAck.encode(&mut expected).unwrap();
    let b = RpMessage::Shut { error: true }
        .encode(&mut expected[a..])
        .unwrap();
    assert_eq!(&rp[..n], &expected[..a + b]);
}

/// The source's SwitchoverStart reaches the host as it arrives, before any
/// record after it.
#[test]
fn a_switchover_start_tells_the_host_the_stop_began() {
    let l = layout(16);
    let stream = [header(), record(Record::Command(Command::SwitchoverStart))].concat();
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    let mut host = Recorder::default();
    assert_eq!(host.stops_announced, 0);
    feed(&mut d, Instant::ZERO, &stream, &mut host).unwrap();
    assert_eq!(host.stops_announced, 1);
    assert_eq!(d.status(), MigrationStatus::Active);
}

/// A return path the caller does not drain fails the migration with a
/// typed error instead of dropping messages, and the SHUT(1) that tells
/// the source still fits.
#[test]
fn a_full_return_path_fails_the_migration_and_still_says_so() {
    let l = layout(16);
    let mut stream = [header(), record(Record::Command(Command::OpenReturnPath))].concat();
    let ping = record(Record::Command(Command::Ping(9)));
    // PONGs are 8 bytes: more than the queue holds.
    for _ in 0..RETURN_PATH_QUEUE / 8 + 1 {
        stream.extend_from_slice(&ping);
    }
    let mut scratch = vec![0; 1 << 20];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    let mut host = Recorder::default();
    assert!(matches!(
        feed(&mut d, Instant::ZERO, &stream, &mut host),
        Err(DestError::ReturnPathFull { needed: 8, .. })
    ));
    assert_eq!(d.status(), MigrationStatus::Failed);
    let mut rp = vec![0u8; RETURN_PATH_QUEUE];
    let n = d.poll_return_path(&mut rp);
    let mut shut = [0u8; 8];
    RpMessage::Shut { error: true }.encode(&mut shut).unwrap();
    assert_eq!(&rp[n - 8..n], &shut);
    assert_eq!(d.poll_return_path(&mut rp), 0);
}

/// The self-check's records in the wrong place, or for other RAM, are typed
/// errors; the right digest verifies, a wrong one names its block.
#[test]
fn digest_records_are_checked_in_order_and_compared() {
    use crate::digest::{DigestBooks, DigestKey, Verification};
    let l = layout(4);
    let key = record(Record::Command(Command::DigestKey(9)));
    let term = DigestKey::new(9).page_term(0, 1, &[0xab; PAGE]);
    let digest = |sums: &[u64]| record(Record::Digest(crate::wire::BlockSums::from_slice(sums)));
    let run = |stream: &[Vec<u8>], books: bool| {
        let mut scratch = vec![0u8; 1 << 20];
        let mut terms = [7u64; 4];
        let mut b = [DigestBooks::new(&l[0], &mut terms).unwrap()];
        let mut d = DestinationEngine::new(&l, &mut scratch);
        if books {
            d.verify_with(&mut b).unwrap();
        }
        let input: Vec<u8> = stream.concat();
        let r = feed(&mut d, Instant::ZERO, &input, &mut Recorder::default());
        (r.map(|_| ()), d.stats().verification)
    };
    let (h, b, eos) = (header(), blocks(&l), record(Record::EndOfStream));
    let pages = batch(0, &[(1, false), (2, true)]);

    let ok = [&h, &b, &key, &pages, &digest(&[term]), &eos].map(Clone::clone);
    assert_eq!(run(&ok, true), (Ok(()), Verification::Verified));
    let wrong = [&h, &b, &key, &pages, &digest(&[term ^ 1]), &eos].map(Clone::clone);
    assert_eq!(
        run(&wrong, true),
        (
            // Without the return path the page cannot be located.
            Err(DestError::DigestMismatch {
                block: 0,
                page: None
            }),
            Verification::Mismatch {
                block: 0,
                page: None
            }
        )
    );
    let missing = [&h, &b, &key, &pages, &eos].map(Clone::clone);
    assert_eq!(run(&missing, true).0, Err(DestError::DigestMissing));
    assert_eq!(run(&ok, false).0, Err(DestError::VerifyUnsupported));
    let late_key = [&h, &b, &pages, &key].map(Clone::clone);
    assert!(matches!(
        run(&late_key, true).0,
        Err(DestError::DigestOutOfOrder(_))
    ));
    let no_key = [&h, &b, &pages, &digest(&[term])].map(Clone::clone);
    assert!(matches!(
        run(&no_key, true).0,
        Err(DestError::DigestOutOfOrder(_))
    ));
    let twice = [&h, &b, &key, &pages, &digest(&[term]), &digest(&[term])].map(Clone::clone);
    assert!(matches!(
        run(&twice, true).0,
        Err(DestError::DigestOutOfOrder(_))
    ));
    let two_blocks = [&h, &b, &key, &pages, &digest(&[term, 0])].map(Clone::clone);
    assert_eq!(
        run(&two_blocks, true).0,
        Err(DestError::DigestBlockCount {
            source: 2,
            destination: 1
        })
    );
    // Without a key from the source, the books stay unused.
    let plain = [&h, &b, &pages, &eos].map(Clone::clone);
    assert_eq!(run(&plain, true), (Ok(()), Verification::Off));
    // Books for other RAM are refused.
    let other = layout(8);
    let mut terms = [0u64; 8];
    let mut books = [DigestBooks::new(&other[0], &mut terms).unwrap()];
    let mut scratch = vec![0u8; 1024];
    let mut d = DestinationEngine::new(&l, &mut scratch);
    assert_eq!(
        d.verify_with(&mut books),
        Err(DestError::DigestBooksMismatch)
    );
}

/// The preamble of a postcopy stream with the preempt channel announced
/// (migration id 7), up to the guest running here.
fn preempt_stream(l: &[BlockInfo<'_>]) -> Vec<u8> {
    postcopy_stream(
        l,
        &[record(Record::Command(Command::PostcopyPreempt {
            migration_id: 7,
        }))],
        &[],
    )
}

fn preempt_hello(migration_id: u64) -> Vec<u8> {
    let mut out = vec![0; PREEMPT_HELLO_LEN];
    PreemptHello { migration_id }.encode(&mut out).unwrap();
    out
}

/// Runs `f` on a fresh postcopy destination of `l` (16 pages), with a
/// preempt decoder when `preempt`.
fn with_postcopy_engine(
    l: &[BlockInfo<'_>],
    preempt: bool,
    f: impl FnOnce(&mut DestinationEngine<'_>),
) {
    let (mut r, mut q) = ([0u64; 1], [0u64; 1]);
    let mut tracking = [PostcopyTracking::new(&mut r, &mut q, 16).unwrap()];
    let (mut scratch, mut ps) = (vec![0; 1 << 20], vec![0; 1 << 20]);
    let mut d = DestinationEngine::with_postcopy(l, &mut scratch, &mut tracking).unwrap();
    if preempt {
        d.take_preempt(&mut ps);
    }
    f(&mut d);
}

fn feed_preempt(
    d: &mut DestinationEngine<'_>,
    now: Instant,
    input: &[u8],
    host: &mut Recorder,
) -> Result<usize, DestError> {
    d.handle_preempt_input(now, input, host)
        .map_err(|e| e.dest_error())
}

#[test]
fn preempt_pages_are_placed_once_whichever_stream_brings_them_first() {
    let l = layout(16);
    with_postcopy_engine(&l, true, |d| {
        let mut host = postcopy_host();
        feed(d, Instant::ZERO, &preempt_stream(&l), &mut host).unwrap();
        assert_eq!(host.preempt, Some(7), "the host was asked to open it");
        assert_eq!(d.status(), MigrationStatus::PostcopyActive);
        let t = Instant::from_millis(1);
        assert_eq!(d.handle_page_fault(t, 0, 3), Ok(true));
        // The hello split across two reads, then the requested page.
        let hello = preempt_hello(7);
        assert_eq!(feed_preempt(d, t, &hello[..5], &mut host), Ok(5));
        let rest = [&hello[5..], &batch(0, &[(3, false)])[..]].concat();
        assert_eq!(feed_preempt(d, t, &rest, &mut host), Ok(rest.len()));
        assert_eq!(host.pages, [(0, 3, PAGE)]);
        assert!(d.is_received(0, 3));
        assert_eq!(d.outstanding_requests(), 0);
        // The main stream's copy comes second and is dropped: the guest may
        // have written the page since. Page 4, not yet here, is placed.
        feed(d, t, &batch(0, &[(3, false), (4, false)]), &mut host).unwrap();
        assert_eq!(host.pages, [(0, 3, PAGE), (0, 4, PAGE)]);
        // And the other way round: a preempt copy after the main one.
        feed_preempt(d, t, &batch(0, &[(4, false), (5, true)]), &mut host).unwrap();
        assert_eq!(host.pages, [(0, 3, PAGE), (0, 4, PAGE)]);
        assert_eq!(host.zeros, [(0, 5, 1)]);
        assert_eq!(d.status(), MigrationStatus::PostcopyActive);
    });
}

#[test]
fn preempt_input_out_of_place_is_refused_by_what_is_wrong() {
    let l = layout(16);
    let mut host = postcopy_host();
    // Before the announcement.
    with_postcopy_engine(&l, true, |d| {
        assert!(matches!(
            feed_preempt(d, Instant::ZERO, &preempt_hello(7), &mut host),
            Err(DestError::PreemptUnexpected(_))
        ));
        assert_eq!(d.status(), MigrationStatus::Failed);
    });

    // A destination without a preempt decoder refuses the announcement.
    with_postcopy_engine(&l, false, |d| {
        assert_eq!(
            feed(d, Instant::ZERO, &preempt_stream(&l), &mut host),
            Err(DestError::PreemptUnsupported)
        );
    });

    // Another migration's hello once the guest runs here: refused, and
    // the migration pauses (its guest is here) instead of failing.
    let other = preempt_hello(8);
    with_postcopy_engine(&l, true, |d| {
        feed(d, Instant::ZERO, &preempt_stream(&l), &mut host).unwrap();
        assert_eq!(
            feed_preempt(d, Instant::ZERO, &other, &mut host),
            Ok(other.len())
        );
        assert!(d.is_paused());
        let why = d.stats().error_desc.as_str();
        assert!(why.contains("0x8, not 0x7"), "{why}");
    });

    // Before the guest runs here the same hello fails the migration.
    with_postcopy_engine(&l, true, |d| {
        let setup = [
            header(),
            record(Record::Command(Command::OpenReturnPath)),
            record(Record::Command(Command::PostcopyAdvise {
                host_page_size: 4096,
                target_page_size: 4096,
            })),
            record(Record::Command(Command::PostcopyPreempt {
                migration_id: 7,
            })),
            blocks(&l),
        ]
        .concat();
        feed(d, Instant::ZERO, &setup, &mut host).unwrap();
        assert_eq!(
            feed_preempt(d, Instant::ZERO, &other, &mut host),
            Err(DestError::PreemptWrongMigration {
                expected: 7,
                found: 8
            })
        );
        assert_eq!(d.status(), MigrationStatus::Failed);
    });

    // A main-stream header instead of a hello, a record other than Pages.
    type Expected = fn(&DestError) -> bool;
    let cases: [(Vec<u8>, Expected); 2] = [
        ([header(), header()].concat(), |e| {
            matches!(e, DestError::Decode(DecodeError::BadMagic { .. }))
        }),
        (
            [
                preempt_hello(7),
                record(Record::Command(Command::PostcopyRun)),
            ]
            .concat(),
            |e| matches!(e, DestError::PreemptUnexpected(_)),
        ),
    ];
    for (input, expected) in cases {
        with_postcopy_engine(&l, true, |d| {
            feed(d, Instant::ZERO, &preempt_stream(&l), &mut host).unwrap();
            let e = feed_preempt(d, Instant::ZERO, &input, &mut host).unwrap_err();
            assert!(expected(&e), "{e:?}");
            assert_eq!(d.status(), MigrationStatus::Failed);
            // The source hears SHUT(1) on the return path.
            assert!(drained(d).ends_with(&[0, 1, 0, 4, 0, 0, 0, 1]));
        });
    }
}

#[test]
fn a_close_after_the_run_pauses_and_recovery_sends_the_bitmap_then_the_requests() {
    let l = layout(16);
    with_postcopy_engine(&l, false, |d| {
        let mut host = postcopy_host();
        let stream = postcopy_stream(&l, &[], &[batch(0, &[(0, false), (1, false), (9, false)])]);
        feed(d, Instant::ZERO, &stream, &mut host).unwrap();
        let t = Instant::from_millis(1);
        assert_eq!(
            d.recover(t),
            Err(DestError::Transition(crate::status::TransitionError {
                from: MigrationStatus::PostcopyActive,
                to: MigrationStatus::PostcopyRecover
            }))
        );
        assert_eq!(d.handle_page_fault(t, 0, 4), Ok(true));
        drained(d);
        // The source goes away mid-record: a pause, not a failure.
        feed(d, t, &batch(0, &[(5, false)])[..10], &mut host).unwrap();
        assert_eq!(d.handle_eof(t), Ok(()));
        assert!(d.is_paused());
        assert!(
            d.stats()
                .error_desc
                .as_str()
                .contains("the guest runs here"),
            "{}",
            d.stats().error_desc.as_str()
        );
        assert_eq!(
            feed(d, t, &header(), &mut host),
            Err(DestError::PostcopyPaused)
        );
        // A vCPU faults while paused: recorded, nothing sent, no timeout.
        assert_eq!(d.handle_page_fault(t, 0, 7), Ok(true));
        assert_eq!(d.poll_return_path(&mut [0; 64]), 0);
        assert_eq!(d.poll_timeout(), None);
        assert_eq!(d.handle_timeout(Instant::from_millis(1_000_000)), Ok(()));
        assert!(d.is_paused());

        // The new connection: the bitmap of pages 0, 1 and 9.
        let t = Instant::from_millis(1_000_001);
        d.recover(t).unwrap();
        assert_eq!(d.status(), MigrationStatus::PostcopyRecover);
        let ask = [
            header(),
            record(Record::Command(Command::RecvBitmap { block: l[0].id })),
        ]
        .concat();
        feed(d, t, &ask, &mut host).unwrap();
        let mut expected = vec![0, 5, 0, 7, 6];
        expected.extend_from_slice(b"pc.ram");
        expected.extend_from_slice(&8u64.to_be_bytes());
        expected.extend_from_slice(&0b10_0000_0011u64.to_le_bytes());
        expected.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
        // Drained in small pieces, the bytes come in order.
        let mut got = Vec::new();
        let mut piece = [0u8; 5];
        loop {
            let n = d.poll_return_path(&mut piece);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(got, expected);
        feed(
            d,
            t,
            &record(Record::Command(Command::PostcopyResume)),
            &mut host,
        )
        .unwrap();
        assert_eq!(d.status(), MigrationStatus::PostcopyActive);
        assert_eq!(d.stats().postcopy_recoveries, 1);
        // RESUME_ACK, then both outstanding requests again.
        let out = drained(d);
        assert_eq!(out[..8], [0, 6, 0, 4, 0, 0, 0, 1]);
        assert_eq!(out[8..12], [0, 3, 0, 19]);
        assert_eq!(out[12..20], (4u64 * 4096).to_be_bytes());
        assert_eq!(out[31..35], [0, 4, 0, 12]);
        assert_eq!(out[35..43], (7u64 * 4096).to_be_bytes());
        assert_eq!(out.len(), 8 + 23 + 16);
        assert!(d.give_up(t).is_err(), "nothing to give up while active");
    });
}

/// Drains the return path whole (bitmaps included).
fn drained_all(d: &mut DestinationEngine<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut piece = [0u8; 256];
    loop {
        let n = d.poll_return_path(&mut piece);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&piece[..n]);
    }
}

/// Issue 12: a recovery's stream announces a new preempt channel under a
/// fresh id; the host is asked to open it, a stale hello (the old
/// channel's id) is refused by pausing again, and on the next recovery's
/// channel the re-sent request's page arrives and is counted. A
/// connection that is no migration stream pauses the recovery too.
#[test]
fn a_recovery_opens_the_preempt_channel_again_under_a_fresh_id() {
    let l = layout(16);
    with_postcopy_engine(&l, true, |d| {
        let mut host = postcopy_host();
        feed(d, Instant::ZERO, &preempt_stream(&l), &mut host).unwrap();
        let t = Instant::from_millis(1);
        feed_preempt(d, t, &preempt_hello(7), &mut host).unwrap();
        feed_preempt(d, t, &batch(0, &[(2, false)]), &mut host).unwrap();
        assert_eq!(d.stats().postcopy_preempt_pages, 1);
        assert_eq!(d.handle_page_fault(t, 0, 3), Ok(true));
        drained(d);
        // The connection goes: both channels with it.
        assert_eq!(d.handle_eof(t), Ok(()));
        assert!(d.is_paused());
        assert!(feed_preempt(d, t, &batch(0, &[(3, false)]), &mut host).is_err());
        let recover = |d: &mut DestinationEngine<'_>, host: &mut Recorder, id: u64| {
            d.recover(t).unwrap();
            assert_eq!(d.stats().postcopy_preempt_pages, 0, "counted anew");
            let announce = [
                header(),
                record(Record::Command(Command::PostcopyPreempt {
                    migration_id: id,
                })),
            ]
            .concat();
            feed(d, t, &announce, host).unwrap();
            assert_eq!(host.preempt, Some(id), "the host opens the new channel");
            assert_eq!(d.status(), MigrationStatus::PostcopyRecover);
        };
        recover(d, &mut host, 8);
        // A connection of the old channel is refused: the guest runs here,
        // so it pauses again rather than fail.
        let stale = preempt_hello(7);
        assert_eq!(feed_preempt(d, t, &stale, &mut host), Ok(stale.len()));
        assert!(d.is_paused(), "{:?}", d.status());
        assert!(
            d.stats().error_desc.as_str().contains("refused"),
            "{}",
            d.stats().error_desc.as_str()
        );
        // A recovery connection that is no migration stream (the preempt
        // hello taken for the main stream) pauses again too.
        d.recover(t).unwrap();
        let not_main = preempt_hello(9);
        assert_eq!(feed(d, t, &not_main, &mut host), Ok(not_main.len()));
        assert!(d.is_paused());
        // The next recovery's channel carries the re-sent request's page.
        recover(d, &mut host, 10);
        feed_preempt(d, t, &preempt_hello(10), &mut host).unwrap();
        let ask = record(Record::Command(Command::RecvBitmap { block: l[0].id }));
        feed(d, t, &ask, &mut host).unwrap();
        drained_all(d);
        let resume = record(Record::Command(Command::PostcopyResume));
        feed(d, t, &resume, &mut host).unwrap();
        assert_eq!(d.status(), MigrationStatus::PostcopyActive);
        let out = drained_all(d);
        assert_eq!(out[..8], [0, 6, 0, 4, 0, 0, 0, 1], "RESUME_ACK");
        assert_eq!(out[8..12], [0, 3, 0, 19], "page 3 asked again");
        feed_preempt(d, t, &batch(0, &[(3, false)]), &mut host).unwrap();
        assert!(d.is_received(0, 3));
        assert_eq!(d.outstanding_requests(), 0);
        assert_eq!(d.stats().postcopy_preempt_pages, 1);
        // A second announcement in a stream is out of place.
        let again = record(Record::Command(Command::PostcopyPreempt {
            migration_id: 11,
        }));
        assert!(matches!(
            feed(d, t, &again, &mut host),
            Err(DestError::PreemptUnexpected(_))
        ));
    });
}

/// A batch of normal pages of 0xab bytes with the given terms (TERMS set).
fn batch_with_terms(pages: &[u64], terms: &[u64]) -> Vec<u8> {
    let entries: Vec<PageEntry> = pages
        .iter()
        .map(|&index| PageEntry {
            index,
            kind: PageKind::Normal,
        })
        .collect();
    let mut out = vec![0; 64 + 16 * entries.len()];
    let n = crate::wire::encode_page_batch_header_with_terms(
        &mut out,
        0,
        12,
        BatchFlags::TERMS,
        &entries,
        terms.iter().copied(),
    )
    .unwrap();
    out.truncate(n);
    for _ in pages {
        out.extend_from_slice(&[0xab; PAGE]);
    }
    out
}

/// Postcopy's check at install: right terms are placed and booked, a
/// wrong one is refused before any page of its batch is placed and names
/// the page, a postcopy batch without terms is refused, and terms without
/// a key are out of order.
#[test]
fn page_terms_are_checked_before_any_page_is_placed() {
    use crate::digest::{DigestBooks, DigestKey, Verification};
    let l = layout(16);
    let key = DigestKey::new(9);
    let term = |page| key.page_term(0, page, &[0xab; PAGE]);
    let run = |pages: &[Vec<u8>], with_key: bool| {
        let (mut r, mut q) = ([0u64; 1], [0u64; 1]);
        let mut tracking = [PostcopyTracking::new(&mut r, &mut q, 16).unwrap()];
        let mut scratch = vec![0; 1 << 20];
        let mut terms = [0u64; 16];
        let mut books = [DigestBooks::new(&l[0], &mut terms).unwrap()];
        let mut d = DestinationEngine::with_postcopy(&l, &mut scratch, &mut tracking).unwrap();
        d.verify_with(&mut books).unwrap();
        let mut host = postcopy_host();
        let preamble = postcopy_stream(
            &l,
            &[if with_key {
                record(Record::Command(Command::DigestKey(9)))
            } else {
                Vec::new()
            }],
            &[],
        );
        feed(&mut d, Instant::ZERO, &preamble, &mut host).unwrap();
        assert_eq!(d.status(), MigrationStatus::PostcopyActive);
        let r = feed(&mut d, Instant::ZERO, &pages.concat(), &mut host);
        let mut rp = vec![0u8; RETURN_PATH_QUEUE];
        let n = d.poll_return_path(&mut rp);
        let refetched = d.stats().postcopy_refetched;
        (
            r.map(|_| ()),
            host.pages,
            (d.stats().verification, refetched),
            rp[..n].to_vec(),
        )
    };
    let good = batch_with_terms(&[3, 4], &[term(3), term(4)]);
    let (r, placed, verdict, _) = run(core::slice::from_ref(&good), true);
    assert_eq!(r, Ok(()));
    assert_eq!(placed, [(0, 3, 2 * PAGE)], "one run");
    assert_eq!(verdict, (Verification::Pending, 0));

    // Page 4's copy is damaged: page 3 is placed, page 4 asked for again
    // (as a fault would: the source still holds it), the second copy
    // installed.
    let damaged = batch_with_terms(&[3, 4], &[term(3), term(4) ^ 1]);
    let again = batch_with_terms(&[4], &[term(4)]);
    let (r, placed, verdict, rp) = run(core::slice::from_ref(&damaged), true);
    assert_eq!(r, Ok(()));
    assert_eq!(placed, [(0, 3, PAGE)]);
    assert_eq!(verdict, (Verification::Pending, 1));
    let mut asked = [0u8; 32];
    let n = RpMessage::ResendPage { block: 0, page: 4 }
        .encode(&mut asked)
        .unwrap();
    assert!(
        rp.windows(n).any(|w| w == &asked[..n]),
        "page 4 is asked for again"
    );
    let (r, placed, verdict, _) = run(&[damaged.clone(), again], true);
    assert_eq!(r, Ok(()));
    assert_eq!(placed, [(0, 3, PAGE), (0, 4, PAGE)]);
    assert_eq!(verdict, (Verification::Pending, 1));

    // Damaged twice: the link damages what it carries; the migration fails
    // with block and page named, to the source too.
    let (r, placed, verdict, rp) = run(&[damaged.clone(), damaged], true);
    assert_eq!(r, Err(DestError::PageTermMismatch { block: 0, page: 4 }));
    assert_eq!(placed, [(0, 3, PAGE)], "page 3 of the second copy waits");
    let named = Verification::Mismatch {
        block: 0,
        page: Some(4),
    };
    assert_eq!(verdict, (named, 1));
    let mut told = [0u8; 32];
    let n = RpMessage::DigestMismatch {
        block: 0,
        page: Some(4),
    }
    .encode(&mut told)
    .unwrap();
    assert!(
        rp.windows(n).any(|w| w == &told[..n]),
        "the source is told block and page"
    );

    // More damaged pages in one batch than may be asked for again.
    let pages: Vec<u64> = (0..=MAX_REFETCHES_PER_BATCH as u64).collect();
    let bad: Vec<u64> = pages.iter().map(|&p| term(p) ^ 1).collect();
    let (r, placed, verdict, _) = run(&[batch_with_terms(&pages, &bad)], true);
    let last = MAX_REFETCHES_PER_BATCH as u64;
    assert_eq!(
        r,
        Err(DestError::PageTermMismatch {
            block: 0,
            page: last
        })
    );
    assert!(placed.is_empty());
    assert_eq!(verdict.1, last);

    let (r, placed, _, _) = run(&[batch(0, &[(3, false)])], true);
    assert_eq!(r, Err(DestError::PageTermsMissing { block: 0 }));
    assert!(placed.is_empty());
    // Zero entries alone need no terms.
    assert_eq!(run(&[batch(0, &[(3, true)])], true).0, Ok(()));

    let (r, _, _, _) = run(&[batch_with_terms(&[3], &[term(3)])], false);
    assert!(matches!(r, Err(DestError::DigestOutOfOrder(_))), "{r:?}");
}

/// What a preempt reader may place ahead of the engine: only batches the
/// engine accepts as well, each refusal named as the engine names it.
#[test]
fn preempt_pages_placed_ahead_are_the_ones_the_engine_takes() {
    use crate::digest::DigestKey;
    let l = layout(16);
    let key = DigestKey::new(9);
    let term = |page| key.page_term(0, page, &[0xab; PAGE]);
    let check = |bytes: &[u8], key: Option<DigestKey>| {
        let mut scratch = vec![0; 1 << 20];
        let mut decoder = StreamDecoder::records(&mut scratch);
        let decoded = decoder.decode(bytes).unwrap();
        assert_eq!(decoded.consumed, bytes.len());
        match decoded.record {
            Some(Record::Pages(batch)) => {
                check_preempt_pages(&l, key, &batch, DigestKey::page_term)
            }
            other => panic!("not a Pages record: {other:?}"),
        }
    };
    let plain = batch(0, &[(3, false), (4, true)]);
    assert_eq!(check(&plain, None), Ok(()));
    assert_eq!(
        check(&plain, Some(key)),
        Err(DestError::PageTermsMissing { block: 0 })
    );
    assert_eq!(check(&batch(0, &[(4, true)]), Some(key)), Ok(()), "zero");
    let termed = batch_with_terms(&[3, 5], &[term(3), term(5)]);
    assert_eq!(check(&termed, Some(key)), Ok(()));
    assert_eq!(
        check(&termed, None),
        Err(DestError::DigestOutOfOrder(
            "page terms without a digest key"
        ))
    );
    assert_eq!(
        check(&batch_with_terms(&[3, 5], &[term(3), term(3)]), Some(key)),
        Err(DestError::PageTermMismatch { block: 0, page: 5 })
    );
    assert_eq!(
        check(&batch(0, &[(16, false)]), None),
        Err(DestError::PageOutOfBlock {
            block: 0,
            page: 16,
            pages: 16
        })
    );
    assert_eq!(
        check(&batch(1, &[(0, false)]), None),
        Err(DestError::NoSuchBlock {
            block: 1,
            blocks: 1
        })
    );
}
