//! Postcopy over userfaultfd: placement semantics (EEXIST, discard), the
//! fault thread's forwarding and deduplication, and bulk placement rates.
//! (A guest running on demand-paged memory is `demo --mode postcopy`'s
//! test, `demo_vcpus.rs`.)
//!
//! Tests skip loudly without userfaultfd permission (and the guest test
//! without `/dev/kvm`); `LIVEMIG_REQUIRE_KVM=1` turns a skip into a failure.

// The process helpers serve the CLI tests.
#[allow(dead_code)]
mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{anonymous_ram, register_or_skip};
use livemig_kvm::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use livemig_kvm::postcopy::{Fault, Placed, PostcopyError};

const MIB: u64 = 1 << 20;
const PAGE: u64 = PAGE_SIZE as u64;
const TIMEOUT: Duration = Duration::from_secs(10);

fn page_of(byte: u8) -> Vec<u8> {
    vec![byte; PAGE_SIZE]
}

fn read_page(ram: &GuestMemory, gpa: u64) -> Vec<u8> {
    let mut buf = page_of(0);
    ram.read(gpa, &mut buf).unwrap();
    buf
}

/// Polls `cond` until it holds, failing after [`TIMEOUT`].
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn placing_twice_counts_already_present_and_keeps_the_first_copy() {
    let ram = anonymous_ram(16 * PAGE);
    let Some(pc) = register_or_skip(&ram) else {
        return;
    };
    // The userfaultfd must not leak into exec'd children (`fd:N` transports).
    // SAFETY: F_GETFD on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(pc.as_fd().as_raw_fd(), libc::F_GETFD) };
    assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);

    let one = |installed, already_present| Placed {
        installed,
        already_present,
    };
    assert_eq!(pc.place(0, &page_of(1)).unwrap(), one(1, 0));
    assert_eq!(pc.place(0, &page_of(2)).unwrap(), one(0, 1));
    assert_eq!(read_page(&ram, 0), page_of(1), "EEXIST left the page alone");
    assert_eq!(pc.stats().already_present, 1);

    // A batch with a present page in the middle: the copy stops there
    // (partial EAGAIN, then EEXIST) and resumes after it.
    assert_eq!(pc.place(3 * PAGE, &page_of(3)).unwrap(), one(1, 0));
    let batch: Vec<u8> = (0..4u8).flat_map(|i| page_of(10 + i)).collect();
    assert_eq!(pc.place(2 * PAGE, &batch).unwrap(), one(3, 1));
    for (p, want) in [(2, 10), (3, 3), (4, 12), (5, 13)] {
        assert_eq!(read_page(&ram, p * PAGE), page_of(want), "page {p}");
    }
    // Zero pages: 0, 2..6 are present, 1, 6, 7 are filled.
    assert_eq!(pc.place_zero(0, 8 * PAGE).unwrap(), one(3, 5));
    assert_eq!(read_page(&ram, PAGE), page_of(0));
    assert_eq!(read_page(&ram, 4 * PAGE), page_of(12));
    let s = pc.stats();
    assert_eq!(
        (s.pages_copied, s.pages_zeroed, s.already_present),
        (5, 3, 7)
    );
    assert_eq!(pc.present_pages(), 8);
    assert!(pc.is_present(7) && !pc.is_present(8));

    // Bad ranges are typed errors, before any ioctl.
    assert!(matches!(
        pc.place(1, &page_of(0)),
        Err(PostcopyError::Misaligned { .. })
    ));
    assert!(matches!(
        pc.place(0, &[0u8; 100]),
        Err(PostcopyError::Misaligned { .. })
    ));
    assert!(matches!(
        pc.place_zero(0, 0),
        Err(PostcopyError::Misaligned { .. })
    ));
    assert!(matches!(
        pc.place(15 * PAGE, &batch),
        Err(PostcopyError::Memory(MemoryError::RangeOutOfRam { .. }))
    ));
    assert!(pc.discard(u64::MAX - PAGE + 1, PAGE).is_err());

    pc.unregister().unwrap();
    assert!(!pc.is_registered());
    assert_eq!(
        pc.place(9 * PAGE, &page_of(9)),
        Err(PostcopyError::NotRegistered)
    );
    assert_eq!(pc.unregister(), Err(PostcopyError::NotRegistered));
    // Unregistered memory is plain memory again: a missing page reads zero.
    assert_eq!(read_page(&ram, 9 * PAGE), page_of(0));
}

#[test]
fn discarded_page_faults_once_for_two_readers_and_shows_the_new_data() {
    let ram = anonymous_ram(16 * PAGE);
    let Some(pc) = register_or_skip(&ram) else {
        return;
    };
    let gpa = 3 * PAGE;
    pc.place(gpa, &page_of(0xAA)).unwrap();
    assert_eq!(read_page(&ram, gpa), page_of(0xAA));
    pc.discard(gpa, PAGE).unwrap();
    assert!(!pc.is_present(3));
    assert_eq!(pc.stats().pages_discarded, 1);

    let (tx, faults) = mpsc::channel::<Fault>();
    let ft = pc
        .start_fault_thread(move |f| {
            let _ = tx.send(f);
        })
        .unwrap();
    assert!(!ft.is_finished());
    let (tid_tx, tids) = mpsc::channel();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let ram = ram.clone();
            let tid_tx = tid_tx.clone();
            thread::spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                read_page(&ram, gpa)
            })
        })
        .collect();
    let tids: Vec<i32> = (0..2).map(|_| tids.recv().unwrap()).collect();

    let first = faults.recv_timeout(TIMEOUT).expect("a fault is forwarded");
    assert_eq!(first.gpa, gpa);
    assert!(!first.write);
    assert!(tids.contains(&first.tid), "{first:?} not from {tids:?}");
    wait_until("both readers' faults", || pc.stats().faults_read == 2);
    let s = pc.stats();
    assert_eq!(
        (s.faults_forwarded, s.faults_duplicate, s.outstanding),
        (1, 1, 1)
    );
    assert!(
        faults.try_recv().is_err(),
        "the second fault was not forwarded"
    );

    thread::sleep(Duration::from_millis(5));
    assert_eq!(pc.place(gpa, &page_of(0x55)).unwrap().installed, 1);
    for r in readers {
        assert_eq!(r.join().unwrap(), page_of(0x55));
    }
    let s = pc.stats();
    assert_eq!((s.outstanding, s.latency_samples), (0, 1));
    assert!(s.latency_median_us.unwrap() >= 5000.0, "{s:?}");
    let mut blocked: Vec<i32> = s.blocktime.iter().map(|&(t, _)| t).collect();
    let mut want = tids.clone();
    blocked.sort_unstable();
    want.sort_unstable();
    assert_eq!(blocked, want, "both readers were blocked");
    assert!(
        s.blocktime
            .iter()
            .all(|&(_, d)| d >= Duration::from_millis(5))
    );
    ft.stop().unwrap();
}

#[test]
fn bulk_placement_rates() {
    let size = 256 * MIB;
    let ram = anonymous_ram(size);
    let Some(pc) = register_or_skip(&ram) else {
        return;
    };
    let half = size / 2;
    let rate = |bytes: u64, t: Duration| bytes as f64 / t.as_secs_f64() / 1e9;
    for chunk in [PAGE, 64 * 1024, MIB] {
        let data: Vec<u8> = (0..chunk).map(|i| (i % 251) as u8 + 1).collect();
        let region = half / 4;
        let base = match chunk {
            PAGE => 0,
            c if c == MIB => 2 * region,
            _ => region,
        };
        let t = Instant::now();
        let mut installed = 0;
        for off in (0..region).step_by(chunk as usize) {
            installed += pc.place(base + off, &data).unwrap().installed;
        }
        let took = t.elapsed();
        assert_eq!(installed, region / PAGE);
        eprintln!(
            "MEASURE UFFDIO_COPY {} KiB per call: {:.2} GB/s ({} MiB in {took:?})",
            chunk / 1024,
            rate(region, took),
            region / MIB
        );
        assert_eq!(
            read_page(&ram, base + region - PAGE),
            data[(chunk - PAGE) as usize..]
        );
    }
    let t = Instant::now();
    let mut zeroed = 0;
    for off in (half..size).step_by(MIB as usize) {
        zeroed += pc.place_zero(off, MIB).unwrap().installed;
    }
    let took = t.elapsed();
    assert_eq!(zeroed, half / PAGE);
    eprintln!(
        "MEASURE UFFDIO_ZEROPAGE 1 MiB per call: {:.2} M pages/s",
        zeroed as f64 / took.as_secs_f64() / 1e6
    );
    assert_eq!(pc.present_pages(), (3 * half / 4 + half) / PAGE);
}
