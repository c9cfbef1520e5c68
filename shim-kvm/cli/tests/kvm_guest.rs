//! Real-KVM tests: the demo guest boots, dirty logging tracks its working
//! set, chunked clears re-arm exactly their chunk, and an in-process
//! "migration" into a second VM continues the guest without a mismatch.
//! Each test skips loudly without `/dev/kvm` (see `common::kvm_available`).

// The process helpers serve the CLI tests.
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::{count_dirty, demo_vm, kvm_available, small_ws, wait_for};
use livemig_kvm::dirty_log::{DirtyLogError, DirtyLogMode};
use livemig_kvm::guest::GuestParams;
use livemig_kvm::memory::{DEFAULT_SLOT_BYTES, PAGE_SIZE};
use livemig_kvm::vcpu::Vcpu;
use livemig_kvm::vm::Vm;
use livemig_kvm::x86::StateError;

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

fn ws_range(p: &GuestParams) -> std::ops::Range<u64> {
    let first = p.ws_start / PAGE_SIZE as u64;
    first..first + u64::from(p.ws_pages)
}

fn bit(words: &[u64], page: u64) -> bool {
    words[(page / 64) as usize] >> (page % 64) & 1 == 1
}

fn gen_after(vcpu: &Vcpu, n: u64) {
    let target = vcpu.stats().generation + n;
    wait_for(vcpu, TIMEOUT, "generations", |v| {
        v.stats().generation >= target
    });
}

#[test]
fn guest_boots_and_dirty_log_tracks_working_set() {
    if !kvm_available() {
        return;
    }
    let params = small_ws();
    let (vm, vcpu) = demo_vm(64 * MIB, &params);
    eprintln!("MEASURE dirty-log mode: {}", vm.dirty_log_mode());
    vcpu.resume().unwrap();
    wait_for(&vcpu, TIMEOUT, "boot", |v| v.stats().booted.is_some());
    let s = vcpu.stats();
    assert_eq!(s.booted, Some(true), "guest must use the parameter block");
    eprintln!(
        "MEASURE boot (resume to ring 3): {:?}",
        s.boot_time.unwrap()
    );
    wait_for(&vcpu, TIMEOUT, "5 generations", |v| {
        v.stats().generation >= 5
    });

    // Unthrottled dirty rate of already-writable pages.
    let (p0, t0) = (vcpu.stats().pages_written, Instant::now());
    std::thread::sleep(Duration::from_millis(200));
    let rate = (vcpu.stats().pages_written - p0) as f64 / t0.elapsed().as_secs_f64();
    eprintln!("MEASURE guest re-dirty rate (no clears): {rate:.0} pages/s");

    let slot = vm.ram().region(0).unwrap();
    let mut log = vec![0u64; slot.bitmap_words()];
    let t = Instant::now();
    vm.get_dirty_log(0, &mut log).unwrap();
    eprintln!(
        "MEASURE get_dirty_log 64 MiB slot: {:?} ({} dirty)",
        t.elapsed(),
        count_dirty(&log)
    );
    if vm.dirty_log_mode() == DirtyLogMode::ManualProtect {
        // Initially-set: everything is reported until cleared.
        assert_eq!(count_dirty(&log), slot.pages());
        let t = Instant::now();
        vm.clear_dirty_log(0, 0, slot.pages(), &log).unwrap();
        eprintln!(
            "MEASURE clear_dirty_log whole 64 MiB slot: {:?}",
            t.elapsed()
        );
        assert_eq!(vm.clear_calls(), 1);
    }
    // Dirty rate right after a clear: every write faults once.
    let (p0, t0) = (vcpu.stats().pages_written, Instant::now());
    gen_after(&vcpu, 3);
    let rate = (vcpu.stats().pages_written - p0) as f64 / t0.elapsed().as_secs_f64();
    eprintln!(
        "MEASURE guest rate over the 3 generations after a full clear (first one write-faults): {rate:.0} pages/s"
    );

    let paused = vcpu.pause().unwrap();
    eprintln!("MEASURE pause latency: {paused:?}");
    vm.get_dirty_log(0, &mut log).unwrap();
    let ws = ws_range(&params);
    assert!(
        ws.clone().all(|p| bit(&log, p)),
        "every working-set page is dirty"
    );
    let outside = count_dirty(&log) - (ws.end - ws.start);
    eprintln!("MEASURE dirty pages outside the working set: {outside}");
    assert!(
        outside <= 8,
        "{outside} pages dirty outside the working set"
    );
    let s = vcpu.stats();
    assert!(s.mismatches.is_empty(), "mismatches: {:?}", s.mismatches);
    assert!(s.progress_exits > 0 && s.pages_written >= 5 * 1024);
    vcpu.resume().unwrap();
    gen_after(&vcpu, 1);
    assert!(vcpu.stats().mismatches.is_empty());
}

#[test]
fn chunked_clear_rearms_only_its_chunk() {
    if !kvm_available() {
        return;
    }
    let params = small_ws();
    let (vm, vcpu) = demo_vm(64 * MIB, &params);
    let pages = vm.ram().region(0).unwrap().pages();
    let mut log = vec![0u64; vm.ram().region(0).unwrap().bitmap_words()];
    if vm.dirty_log_mode() == DirtyLogMode::Legacy {
        eprintln!("SKIPPED: manual dirty-log protect not offered; checking the refusal only");
        assert_eq!(
            vm.clear_dirty_log(0, 0, 64, &log),
            Err(DirtyLogError::NotManualProtect)
        );
        return;
    }
    vcpu.resume().unwrap();
    wait_for(&vcpu, TIMEOUT, "2 generations", |v| {
        v.stats().generation >= 2
    });
    vcpu.pause().unwrap();
    vm.get_dirty_log(0, &mut log).unwrap();

    // The chunk: the first 64 pages of the working set (page 512 = word 8).
    let first = ws_range(&params).start;
    let word = (first / 64) as usize;
    assert_eq!(log[word], u64::MAX);
    let before = vm.clear_calls();
    vm.clear_dirty_log(0, first, 64, &log[word..word + 1])
        .unwrap();
    assert_eq!(vm.clear_calls(), before + 1);

    let mut after = vec![0u64; log.len()];
    vm.get_dirty_log(0, &mut after).unwrap();
    assert_eq!(after[word], 0, "the cleared chunk is clean");
    assert_eq!(
        after[word + 1],
        u64::MAX,
        "the neighbour chunk was not touched"
    );

    // Misaligned or oversized ranges are refused before reaching KVM.
    assert!(matches!(
        vm.clear_dirty_log(0, first + 1, 64, &log[word..]),
        Err(DirtyLogError::Misaligned { .. })
    ));
    assert!(matches!(
        vm.clear_dirty_log(0, first, 65, &log[word..]),
        Err(DirtyLogError::Misaligned { .. })
    ));
    assert!(matches!(
        vm.clear_dirty_log(0, pages - 64, 128, &log),
        Err(DirtyLogError::OutOfRange { .. })
    ));
    assert_eq!(
        vm.clear_calls(),
        before + 1,
        "refused clears issue no ioctl"
    );

    // One full generation later the guest has rewritten the chunk.
    vcpu.resume().unwrap();
    gen_after(&vcpu, 2);
    vcpu.pause().unwrap();
    vm.get_dirty_log(0, &mut after).unwrap();
    assert_eq!(after[word], u64::MAX, "the chunk's pages are dirty again");
    assert!(vcpu.stats().mismatches.is_empty());

    // Timing of chunked clears over the whole slot (64-page chunks).
    vm.get_dirty_log(0, &mut log).unwrap();
    let t = Instant::now();
    for (i, w) in log.chunks(1).enumerate() {
        vm.clear_dirty_log(0, i as u64 * 64, 64, w).unwrap();
    }
    eprintln!(
        "MEASURE clear_dirty_log 64 MiB slot in 64-page chunks: {:?} ({} calls)",
        t.elapsed(),
        log.len()
    );
}

#[test]
fn in_process_migration_continues_the_guest() {
    if !kvm_available() {
        return;
    }
    let params = small_ws();
    let (src_vm, src) = demo_vm(64 * MIB, &params);
    src.resume().unwrap();
    wait_for(&src, TIMEOUT, "3 generations", |v| {
        v.stats().generation >= 3
    });
    let stop = src.pause().unwrap();
    let gen_at_stop = src.stats().generation;

    let t = Instant::now();
    let dst_vm = Vm::new(64 * MIB, DEFAULT_SLOT_BYTES).unwrap();
    let dst = Vcpu::new(&dst_vm).unwrap();
    let (src_ram, dst_ram) = (src_vm.ram(), dst_vm.ram());
    let mut page = [0u8; PAGE_SIZE];
    let mut copied = 0;
    for (i, slot) in src_ram.regions().iter().enumerate() {
        for p in 0..slot.pages() {
            if !src_ram.is_zero_page(i, p).unwrap() {
                src_ram.read_page(i, p, &mut page).unwrap();
                dst_ram.write_page(i, p, &page).unwrap();
                copied += 1;
            }
        }
    }
    let blob = src.save_state().unwrap();
    dst.load_state(&blob).unwrap();
    let digest = src_ram.digest();
    assert_eq!(digest, dst_ram.digest(), "memory differs after the copy");
    eprintln!(
        "MEASURE in-process stop-and-copy: vCPU stop {stop:?}, copy {copied} pages + {} byte state in {:?}",
        blob.len(),
        t.elapsed()
    );

    dst.resume().unwrap();
    wait_for(&dst, TIMEOUT, "generations on the destination", |v| {
        v.stats().generation >= gen_at_stop + 3
    });
    let s = dst.stats();
    assert!(
        s.mismatches.is_empty(),
        "destination mismatches: {:?}",
        s.mismatches
    );
    assert!(src.stats().mismatches.is_empty());
    assert!(
        s.booted.is_none(),
        "the destination continued, it did not reboot"
    );
    // The source, still paused, kept the memory it had at the stop.
    assert_eq!(src_ram.digest(), digest);
}

#[test]
fn state_calls_need_a_paused_vcpu_and_reject_bad_blobs() {
    if !kvm_available() {
        return;
    }
    let (_vm, vcpu) = demo_vm(64 * MIB, &small_ws());
    let blob = vcpu.save_state().unwrap();
    assert!(matches!(
        vcpu.load_state(&blob[..blob.len() - 1]),
        Err(StateError::LengthMismatch { .. })
    ));
    let mut bad = blob.clone();
    bad[4] = 9;
    assert!(matches!(
        vcpu.load_state(&bad),
        Err(StateError::BadVersion { found: 9, .. })
    ));
    vcpu.load_state(&blob).unwrap();
    vcpu.resume().unwrap();
    wait_for(&vcpu, TIMEOUT, "boot", |v| v.stats().booted.is_some());
    assert_eq!(vcpu.save_state().unwrap_err(), StateError::NotPaused);
    assert_eq!(vcpu.load_state(&blob).unwrap_err(), StateError::NotPaused);
}

#[test]
fn throttle_holds_the_dirty_rate_and_idle_guest_runs() {
    if !kvm_available() {
        return;
    }
    let (_vm, vcpu) = demo_vm(64 * MIB, &small_ws());
    vcpu.set_dirty_rate_limit(20_000);
    vcpu.resume().unwrap();
    wait_for(&vcpu, TIMEOUT, "boot", |v| v.stats().booted.is_some());
    let (p0, t0) = (vcpu.stats().pages_written, Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let rate = (vcpu.stats().pages_written - p0) as f64 / t0.elapsed().as_secs_f64();
    eprintln!("MEASURE throttled to 20000 pages/s: {rate:.0} pages/s");
    assert!((10_000.0..=30_000.0).contains(&rate), "rate {rate}");
    // A pause is prompt even while the vCPU thread is sleeping in the throttle.
    let t = vcpu.pause().unwrap();
    assert!(t < Duration::from_millis(100), "pause took {t:?}");

    let idle = GuestParams {
        ws_pages: 0,
        idle_spins: 100_000,
        ..small_ws()
    };
    let (_vm, vcpu) = demo_vm(64 * MIB, &idle);
    vcpu.resume().unwrap();
    wait_for(&vcpu, TIMEOUT, "idle progress", |v| {
        v.stats().progress_exits >= 3
    });
    let t = vcpu.pause().unwrap();
    eprintln!("MEASURE pause latency, idle guest: {t:?}");
    let s = vcpu.stats();
    assert_eq!((s.pages_written, s.generation), (0, 0));
}

fn big_guest(ram: u64) {
    let t = Instant::now();
    let params = GuestParams {
        ws_start: ram - 256 * PAGE_SIZE as u64,
        ws_pages: 256,
        ..GuestParams::default()
    };
    let (vm, vcpu) = demo_vm(ram, &params);
    vcpu.resume().unwrap();
    wait_for(&vcpu, TIMEOUT, "3 generations", |v| {
        v.stats().generation >= 3
    });
    eprintln!(
        "MEASURE {} MiB guest: create + boot + 3 generations at the top of RAM in {:?} (boot {:?})",
        ram / MIB,
        t.elapsed(),
        vcpu.stats().boot_time.unwrap()
    );
    vcpu.pause().unwrap();
    let slots = vm.ram().regions().len();
    let last = vm.ram().region(slots - 1).unwrap();
    let mut log = vec![0u64; last.bitmap_words()];
    let t = Instant::now();
    vm.get_dirty_log(slots - 1, &mut log).unwrap();
    eprintln!("MEASURE get_dirty_log 1 GiB slot: {:?}", t.elapsed());
    let t = Instant::now();
    let d = vm.ram().digest();
    eprintln!(
        "MEASURE digest of {} MiB: {:?} ({d:#x})",
        ram / MIB,
        t.elapsed()
    );
    assert!(vcpu.stats().mismatches.is_empty());
}

#[test]
fn one_gib_guest_boots_and_runs() {
    if kvm_available() {
        big_guest(1024 * MIB);
    }
}

#[test]
fn four_gib_guest_reaches_the_top_of_ram() {
    if kvm_available() {
        big_guest(4096 * MIB);
    }
}

/// Copies to `dst` every page whose bit is set in the freshly fetched dirty
/// log of each slot, clearing (re-protecting) it first when `clear` is set so
/// writes during the copy show up in the next round. Returns pages copied.
fn copy_dirty(src: &Vm, dst: &Vm, log: &mut [u64], clear: bool) -> u64 {
    let mut page = [0u8; PAGE_SIZE];
    let mut copied = 0;
    for (i, slot) in src.ram().regions().iter().enumerate() {
        let words = &mut log[..slot.bitmap_words()];
        src.get_dirty_log(i, words).unwrap();
        if clear {
            src.clear_dirty_log(i, 0, slot.pages(), words).unwrap();
        }
        for (w, &bits) in words.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let p = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                src.ram().read_page(i, p, &mut page).unwrap();
                dst.ram().write_page(i, p, &page).unwrap();
                copied += 1;
            }
        }
    }
    copied
}

#[test]
fn live_copy_driven_by_the_dirty_log_ends_identical() {
    if !kvm_available() {
        return;
    }
    let params = small_ws();
    let (src_vm, src) = demo_vm(64 * MIB, &params);
    if src_vm.dirty_log_mode() == DirtyLogMode::Legacy {
        eprintln!("SKIPPED: live copy test needs manual dirty-log protect");
        return;
    }
    // Slow the guest so each round sees a partial working set.
    src.set_dirty_rate_limit(20_000);
    src.resume().unwrap();
    wait_for(&src, TIMEOUT, "2 generations", |v| {
        v.stats().generation >= 2
    });
    let dst_vm = Vm::new(64 * MIB, DEFAULT_SLOT_BYTES).unwrap();
    let dst = Vcpu::new(&dst_vm).unwrap();
    let mut log = vec![0u64; src_vm.ram().region(0).unwrap().bitmap_words()];
    for round in 0..4 {
        let n = copy_dirty(&src_vm, &dst_vm, &mut log, true);
        eprintln!("MEASURE live copy round {round}: {n} pages");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = Instant::now();
    src.pause().unwrap();
    let last = copy_dirty(&src_vm, &dst_vm, &mut log, false);
    dst.load_state(&src.save_state().unwrap()).unwrap();
    eprintln!(
        "MEASURE final round: {last} pages, stop-to-copied {:?}",
        stop.elapsed()
    );
    assert_eq!(src_vm.ram().digest(), dst_vm.ram().digest());
    let gen_at_stop = src.stats().generation;
    dst.resume().unwrap();
    wait_for(&dst, TIMEOUT, "destination generations", |v| {
        v.stats().generation >= gen_at_stop + 2
    });
    assert!(
        dst.stats().mismatches.is_empty(),
        "{:?}",
        dst.stats().mismatches
    );
}
