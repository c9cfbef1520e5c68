//! End-to-end sanity check of the simulated world without the engines: a
//! naive precopy copier (get the log without clearing, clear each chunk with
//! its mask just before sending it, copy its dirty pages over a link)
//! migrates a guest that keeps dirtying a 64 MiB working set of a 1 GiB
//! memory for one simulated second, then stops it and finishes. The memories
//! must end identical. This proves the clock, memory, dirty log, workload and
//! link compose the way the real engines will use them.

use livemig_sim::{
    BlockSpec, LinkConfig, SimClock, SimDirtyLog, SimLink, SimRam, Stamp, WorkingSet, Workload,
    fill,
};

const PAGE: usize = 4096;
const GIB_PAGES: u64 = (1 << 30) / PAGE as u64;
/// Pages per clear chunk (a 64-word slice of the bitmap).
const CHUNK_PAGES: u64 = 4096;
/// Shortest round: the copier syncs the dirty log at most every 10 ms.
const MIN_ROUND_NS: u64 = 10_000_000;
/// The guest runs for one simulated second.
const RUN_NS: u64 = 1_000_000_000;
/// Record header: block (u32 LE), page (u64 LE), kind (0 = zero, 1 = data).
const HEADER: usize = 13;

/// The copier's sending side: one round over every block's dirty log.
/// Returns the number of pages sent.
fn send_round(
    src: &SimRam,
    log: &mut SimDirtyLog,
    link: &mut SimLink,
    clock: &mut SimClock,
) -> u64 {
    let mut sent = 0;
    let mut out = Vec::new();
    for block in 0..src.blocks().len() {
        let pages = src.blocks()[block].pages;
        let mut bitmap = vec![0u64; log.bitmap_words(block).unwrap()];
        log.get(block, &mut bitmap).unwrap();
        for (c, mask) in bitmap.chunks(CHUNK_PAGES as usize / 64).enumerate() {
            if mask.iter().all(|&w| w == 0) {
                continue;
            }
            let first = c as u64 * CHUNK_PAGES;
            let count = CHUNK_PAGES.min(pages - first);
            // Clear before reading the pages: a write after this point
            // re-dirties the page for the next round.
            log.clear(block, first, count, mask).unwrap();
            out.clear();
            for (w, &word) in mask.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let page = first + w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    out.extend_from_slice(&(block as u32).to_le_bytes());
                    out.extend_from_slice(&page.to_le_bytes());
                    if src.is_zero(block, page).unwrap() {
                        out.push(0);
                    } else {
                        out.push(1);
                        out.extend_from_slice(src.page(block, page).unwrap());
                    }
                    sent += 1;
                }
            }
            let done = link.send(clock.now_ns(), &out).unwrap();
            clock.advance_to(done);
        }
    }
    sent
}

/// The copier's receiving side: parses whole records out of `pending`.
fn receive(link: &mut SimLink, now: u64, pending: &mut Vec<u8>, dst: &mut SimRam) {
    // Receive straight into the tail of `pending`, in-flight bytes at once.
    let have = pending.len();
    pending.resize(have + link.bytes_in_flight() as usize, 0);
    let n = link.recv(now, &mut pending[have..]);
    pending.truncate(have + n);
    let mut at = 0;
    while let Some(h) = pending.get(at..at + HEADER) {
        let block = u32::from_le_bytes(h[..4].try_into().unwrap()) as usize;
        let page = u64::from_le_bytes(h[4..12].try_into().unwrap());
        if h[12] == 0 {
            dst.zero_page(block, page).unwrap();
            at += HEADER;
        } else {
            let Some(data) = pending.get(at + HEADER..at + HEADER + PAGE) else {
                break;
            };
            dst.write_page(block, page, data).unwrap();
            at += HEADER + PAGE;
        }
    }
    pending.drain(..at);
}

#[test]
fn naive_precopy_of_a_dirtying_guest_converges_to_identical_memory() {
    let layout = vec![
        BlockSpec::new("pc.ram", GIB_PAGES, PAGE),
        BlockSpec::new("vga.vram", 100, PAGE),
    ];
    let mut src = SimRam::new(layout.clone()).unwrap();
    let mut dst = SimRam::new(layout).unwrap();
    // Initially set: the first round visits every page of the guest.
    let mut log = SimDirtyLog::new(src.blocks());
    fill(&mut src, &mut log, 2000, 11).unwrap();
    let set = WorkingSet {
        block: 0,
        first_page: 1 << 16,
        pages: (64 << 20) / PAGE as u64,
    };
    let rate = 20_000; // pages/s, ~80 MB/s against a 1 GB/s link
    let mut guest = Workload::new(&src, set, rate, 5).unwrap();
    let mut link = SimLink::new(LinkConfig::new(1_000_000_000, 50_000));
    let mut clock = SimClock::new();
    let mut pending = Vec::new();

    let mut rounds = 0;
    let mut guest_ran_to = 0;
    loop {
        rounds += 1;
        assert!(rounds < 1000, "copier does not converge");
        let start = clock.now_ns();
        let sent = send_round(&src, &mut log, &mut link, &mut clock);
        clock.advance_to(start + MIN_ROUND_NS);
        if guest_ran_to < RUN_NS {
            // The guest ran while this round was copying.
            let to = clock.now_ns().min(RUN_NS);
            guest.advance(&mut src, &mut log, guest_ran_to, to).unwrap();
            guest_ran_to = to;
        }
        receive(&mut link, clock.now_ns(), &mut pending, &mut dst);
        if sent == 0 && guest_ran_to >= RUN_NS {
            break;
        }
    }

    link.close(clock.now_ns());
    while let Some(t) = link.next_arrival_ns() {
        clock.advance_to(t);
        receive(&mut link, clock.now_ns(), &mut pending, &mut dst);
    }
    clock.advance_to(link.end_at_ns().unwrap());
    assert!(link.is_eof(clock.now_ns()));
    assert!(pending.is_empty(), "stream ended mid-record");

    assert_eq!(
        guest.writes(),
        rate,
        "exactly one simulated second of writes"
    );
    assert_eq!(src.diff(&dst), None);
    assert_eq!(src.digest(), dst.digest());
    assert_eq!(link.bytes_delivered(), link.bytes_sent());
    // The destination holds the newest generation of every written page.
    let newest = (set.first_page..set.first_page + set.pages)
        .filter_map(|p| Stamp::read(dst.page(0, p).unwrap()).filter(|s| s.page == p))
        .map(|s| s.generation)
        .max();
    assert_eq!(newest, Some(rate));
    assert!(rounds > 2, "the guest kept dirtying across rounds");
    assert!(
        log.cleared_pages() >= GIB_PAGES,
        "the first round cleared every page"
    );
    assert!(clock.now_ns() < 2 * RUN_NS, "took {} ns", clock.now_ns());
}

/// An idle 4 GiB guest (1 Mi pages, a thousand of them nonzero): one round
/// sends every page, mostly as zero records, and a second finds nothing
/// dirty. Proves the sparse memory and the bitmap scan keep a big idle guest
/// cheap.
#[test]
fn idle_4gib_guest_copies_in_one_round() {
    let layout = vec![BlockSpec::new("pc.ram", 4 * GIB_PAGES, PAGE)];
    let mut src = SimRam::new(layout.clone()).unwrap();
    let mut dst = SimRam::new(layout).unwrap();
    let mut log = SimDirtyLog::new(src.blocks());
    fill(&mut src, &mut log, 1000, 3).unwrap();
    let mut link = SimLink::new(LinkConfig::new(1_000_000_000, 50_000));
    let mut clock = SimClock::new();
    let mut pending = Vec::new();
    assert_eq!(
        send_round(&src, &mut log, &mut link, &mut clock),
        4 * GIB_PAGES
    );
    clock.advance_to(link.next_arrival_ns().unwrap());
    clock.advance_to(link.free_at_ns() + 50_000);
    receive(&mut link, clock.now_ns(), &mut pending, &mut dst);
    assert!(pending.is_empty());
    assert_eq!(send_round(&src, &mut log, &mut link, &mut clock), 0);
    assert_eq!(src.diff(&dst), None);
    assert_eq!(src.digest(), dst.digest());
}
