//! Postcopy over userfaultfd: placement semantics (EEXIST, discard), the
//! fault thread's forwarding and deduplication, bulk placement rates, and an
//! in-process postcopy of the demo guest where the destination runs on
//! memory that is fetched page by page from the paused source.
//!
//! Tests skip loudly without userfaultfd permission (and the guest test
//! without `/dev/kvm`); `LIVEMIG_REQUIRE_KVM=1` turns a skip into a failure.

// The process helpers serve the CLI tests.
#[allow(dead_code)]
mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    anonymous_ram, count_dirty, demo_vm, kvm_available, register_or_skip, small_ws, wait_for,
};
use livemig_kvm::dirty_log::DirtyLogMode;
use livemig_kvm::guest::GuestParams;
use livemig_kvm::memory::{DEFAULT_SLOT_BYTES, GuestMemory, MemoryError, PAGE_SIZE};
use livemig_kvm::postcopy::{Fault, FaultThread, Placed, PostcopyError, PostcopyRam};
use livemig_kvm::vcpu::{Vcpu, VcpuError};
use livemig_kvm::vm::Vm;

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

    // The misleading exit of a vCPU whose fault never reached userfaultfd
    // is named for what it is while the RAM is registered.
    let vanished = VcpuError::Stopped(Some(Box::new(VcpuError::MemoryVanished { addr: 5 * PAGE })));
    assert_eq!(
        pc.explain_vcpu_error(&vanished),
        Some(PostcopyError::FaultNotDelivered { addr: 5 * PAGE })
    );
    assert_eq!(pc.explain_vcpu_error(&VcpuError::NotPaused), None);

    pc.unregister().unwrap();
    assert!(!pc.is_registered());
    assert_eq!(pc.explain_vcpu_error(&vanished), None);
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

/// Places the source's copy of every page of `first .. end` (guest page
/// numbers) not yet present on the destination, as zero-page fills or
/// copies of runs of up to 256 pages. Returns what was placed.
fn push_missing(src: &GuestMemory, pc: &PostcopyRam, first: u64, end: u64) -> Placed {
    let mut total = Placed::default();
    let mut buf = vec![0u8; MIB as usize];
    let mut p = first;
    while p < end {
        if pc.is_present(p) {
            p += 1;
            continue;
        }
        let zero = src.is_zero_page(0, p).unwrap();
        // The first page is placed even if a fault got it meanwhile
        // (EEXIST then), so a run is never empty.
        let start = p;
        p += 1;
        while p < end
            && p - start < 256
            && !pc.is_present(p)
            && src.is_zero_page(0, p).unwrap() == zero
        {
            p += 1;
        }
        let len = (p - start) * PAGE;
        let placed = if zero {
            pc.place_zero(start * PAGE, len).unwrap()
        } else {
            let data = &mut buf[..len as usize];
            src.read(start * PAGE, data).unwrap();
            pc.place(start * PAGE, data).unwrap()
        };
        total.installed += placed.installed;
        total.already_present += placed.already_present;
    }
    total
}

fn thread_name(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A source VM paused mid-run and a destination VM whose empty RAM is
/// registered for postcopy, with the source's vCPU state loaded, parked.
struct Postcopy {
    a_vm: Vm,
    a_gen: u64,
    b_vm: Vm,
    b: Vcpu,
    pc: Arc<PostcopyRam>,
}

const RAM: u64 = 64 * MIB;

/// Builds a [`Postcopy`], or `None` after a loud skip.
fn postcopy_pair(params: &GuestParams) -> Option<Postcopy> {
    if !kvm_available() {
        return None;
    }
    let (a_vm, a) = demo_vm(RAM, params);
    a.resume().unwrap();
    wait_for(&a, TIMEOUT, "3 generations on A", |v| {
        v.stats().generation >= 3
    });
    a.pause().unwrap();
    let blob = a.save_state().unwrap();
    let b_vm = Vm::new(RAM, DEFAULT_SLOT_BYTES).unwrap();
    let b = Vcpu::new(&b_vm).unwrap();
    let pc = register_or_skip(b_vm.ram())?;
    b.load_state(&blob).unwrap();
    Some(Postcopy {
        a_gen: a.stats().generation,
        a_vm,
        b_vm,
        b,
        pc,
    })
}

/// The fault server: answers each forwarded fault from the source's memory,
/// as the source answers a page request on the return path, until the
/// fault thread (and with it the sender) is gone. Returns faults served.
fn serve(
    pc: &Arc<PostcopyRam>,
    src: &GuestMemory,
    faults: mpsc::Receiver<Fault>,
) -> thread::JoinHandle<u64> {
    let (pc, src) = (Arc::clone(pc), src.clone());
    thread::spawn(move || {
        let mut page = page_of(0);
        let mut served = 0u64;
        for f in faults {
            if src.is_zero_page(0, f.gpa / PAGE).unwrap() {
                pc.place_zero(f.gpa, PAGE).unwrap();
            } else {
                src.read(f.gpa, &mut page).unwrap();
                pc.place(f.gpa, &page).unwrap();
            }
            served += 1;
        }
        served
    })
}

/// Starts the fault thread with a channel as its sink.
fn forward_faults(pc: &Arc<PostcopyRam>) -> (FaultThread, mpsc::Receiver<Fault>) {
    let (tx, faults) = mpsc::channel::<Fault>();
    let ft = pc
        .start_fault_thread(move |f| {
            let _ = tx.send(f);
        })
        .unwrap();
    (ft, faults)
}

#[test]
fn demo_guest_runs_on_demand_paged_memory_after_postcopy() {
    let params = small_ws();
    let Some(Postcopy {
        a_vm,
        a_gen,
        b_vm,
        b,
        pc,
    }) = postcopy_pair(&params)
    else {
        return;
    };
    let pages = RAM / PAGE;
    let a_ram = a_vm.ram().clone();
    // From here on a dirty bit means "B's guest wrote the page".
    let mut log = vec![0u64; b_vm.ram().region(0).unwrap().bitmap_words()];
    b_vm.get_dirty_log(0, &mut log).unwrap();
    if b_vm.dirty_log_mode() == DirtyLogMode::ManualProtect {
        b_vm.clear_dirty_log(0, 0, pages, &log).unwrap();
    }
    let (ft, faults) = forward_faults(&pc);
    let server = serve(&pc, &a_ram, faults);

    // Postcopy: B starts at once, with nothing of A's memory present.
    let resumed = Instant::now();
    b.resume().unwrap();
    wait_until("256 faults", || pc.stats().faults_forwarded >= 256);
    // The background push of everything else, racing the guest's faults
    // (a page placed by both gets EEXIST on the second placement).
    let copier = {
        let (pc, a_ram) = (Arc::clone(&pc), a_ram.clone());
        thread::spawn(move || {
            let t = Instant::now();
            let placed = push_missing(&a_ram, &pc, 0, pages);
            (placed, t.elapsed())
        })
    };
    let (pushed, push_time) = copier.join().unwrap();
    eprintln!(
        "MEASURE postcopy background push: {} pages placed, {} already present, in {push_time:?}",
        pushed.installed, pushed.already_present
    );
    assert_eq!(pc.present_pages(), pages, "every page arrived");
    wait_for(&b, TIMEOUT, "generations on B", |v| {
        v.stats().generation >= a_gen + 3
    });
    eprintln!(
        "MEASURE postcopy: 3 generations on B {:?} after its resume",
        resumed.elapsed()
    );
    b.pause().unwrap();

    let s = b.stats();
    assert!(s.mismatches.is_empty(), "B mismatches: {:?}", s.mismatches);
    assert!(s.booted.is_none(), "B continued A's run, it did not reboot");
    // Every page B's guest did not write is A's page at the stop.
    b_vm.get_dirty_log(0, &mut log).unwrap();
    let ws = params.ws_start / PAGE..params.ws_start / PAGE + u64::from(params.ws_pages);
    let mut outside = 0;
    for p in 0..pages {
        if log[(p / 64) as usize] >> (p % 64) & 1 == 1 {
            outside += u64::from(!ws.contains(&p));
        } else {
            assert_eq!(
                read_page(b_vm.ram(), p * PAGE),
                read_page(&a_ram, p * PAGE),
                "page {p} differs though B never wrote it"
            );
        }
    }
    eprintln!(
        "MEASURE postcopy: B wrote {} pages, {outside} outside the working set",
        count_dirty(&log)
    );
    assert!(
        outside <= 8,
        "{outside} pages written outside the working set"
    );

    ft.stop().unwrap();
    let served = server.join().unwrap();
    let st = pc.stats();
    eprintln!(
        "MEASURE postcopy faults: {served} served, {} read, {} duplicate, {} stale; latency median {:.1} us p99 {:.1} us over {} samples; blocktime {:?}",
        st.faults_read,
        st.faults_duplicate,
        st.faults_stale,
        st.latency_median_us.unwrap_or(0.0),
        st.latency_p99_us.unwrap_or(0.0),
        st.latency_samples,
        st.blocktime
    );
    assert!(served >= 256);
    assert_eq!(served, st.faults_forwarded);
    assert_eq!(st.outstanding, 0);
    assert_eq!(st.latency_samples as u64, served);
    assert_eq!(
        st.pages_copied + st.pages_zeroed,
        pages,
        "each page installed once"
    );
    // Only B's vCPU thread touched B's memory, so it alone was blocked.
    assert_eq!(st.blocktime.len(), 1, "{:?}", st.blocktime);
    assert_eq!(thread_name(st.blocktime[0].0), "livemig-vcpu0");
    assert!(st.blocktime[0].1 > Duration::ZERO);

    // Postcopy over: B runs on plain memory.
    pc.unregister().unwrap();
    let before = b.stats().generation;
    b.resume().unwrap();
    wait_for(&b, TIMEOUT, "B after unregister", |v| {
        v.stats().generation > before
    });
    assert!(b.stats().mismatches.is_empty());
}

/// A pause that lands while the vCPU waits for a missing page completes
/// once the page is served. (On this PVM host KVM does not leave `KVM_RUN`
/// for the kick while the fault is outstanding: the vCPU thread refaults in
/// a loop, every refault a new userfaultfd event, which the fault thread
/// counts as a duplicate instead of requesting the page again.)
#[test]
fn pause_of_a_vcpu_waiting_for_a_page_completes_once_served() {
    let Some(Postcopy {
        a_vm, a_gen, b, pc, ..
    }) = postcopy_pair(&small_ws())
    else {
        return;
    };
    let (ft, faults) = forward_faults(&pc);
    b.resume().unwrap();
    wait_until("the first fault", || pc.stats().faults_read >= 1);
    let (paused, waited, server) = thread::scope(|s| {
        let t = Instant::now();
        let b = &b;
        let pauser = s.spawn(move || b.pause().map(|_| t.elapsed()));
        thread::sleep(Duration::from_millis(20));
        let waited = pc.stats();
        let server = serve(&pc, a_vm.ram(), faults);
        (pauser.join().unwrap(), waited, server)
    });
    let paused = paused.unwrap();
    eprintln!(
        "MEASURE pause while blocked on a missing page: {paused:?} (20 ms unserved); {} faults read, {} duplicates while unserved",
        waited.faults_read, waited.faults_duplicate
    );
    assert_eq!(waited.faults_forwarded, 1, "one page requested: {waited:?}");
    // Either the kick had to wait for the page (this host), or KVM left
    // KVM_RUN for it at once and the vCPU never refaulted.
    assert!(paused >= Duration::from_millis(20) || waited.faults_duplicate == 0);

    // The parked vCPU resumes and keeps running on served pages.
    b.resume().unwrap();
    wait_for(&b, TIMEOUT, "a generation on B", |v| {
        v.stats().generation > a_gen
    });
    b.pause().unwrap();
    assert!(b.stats().mismatches.is_empty());
    ft.stop().unwrap();
    let served = server.join().unwrap();
    assert_eq!(served, pc.stats().faults_forwarded);
}
