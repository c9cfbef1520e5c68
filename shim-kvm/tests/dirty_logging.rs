//! Dirty logging on memslots the VMM registered itself: livemig turns
//! `KVM_MEM_LOG_DIRTY_PAGES` on for them and off again.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use livemig_kvm::dirty_log::{DirtyLogError, DirtyLogMode, DirtyLogging};
use livemig_kvm::memory::{GuestMemory, GuestRegion, PAGE_SIZE, RegionLayout};

const PAGE: u64 = PAGE_SIZE as u64;

/// Whether `/dev/kvm` can be used. Without it the test skips loudly,
/// unless `LIVEMIG_REQUIRE_KVM=1` (CI on KVM hosts), where skipping is a
/// failure (as the livemig-cli tests do).
fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("LIVEMIG_REQUIRE_KVM").as_deref() != Ok("1"),
            "LIVEMIG_REQUIRE_KVM=1 but /dev/kvm is not available"
        );
        eprintln!("SKIPPED: /dev/kvm not available");
    }
    ok
}

fn count_dirty(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Two regions with a hole between them, memslots 2 and 5, registered the
/// way a VMM registers its RAM: without flags.
fn vmm_vm() -> (VmFd, GuestMemory) {
    let vm = Kvm::new().unwrap().create_vm().unwrap();
    let layout = [
        RegionLayout {
            name: "ram-low".into(),
            guest_phys: 0,
            len: 256 * PAGE,
            slot: 2,
        },
        RegionLayout {
            name: "ram-high".into(),
            guest_phys: 1 << 20,
            len: 100 * PAGE,
            slot: 5,
        },
    ];
    let memory = GuestMemory::anonymous(&layout).unwrap();
    for r in memory.regions() {
        let memslot = kvm_userspace_memory_region {
            slot: r.slot(),
            flags: 0,
            guest_phys_addr: r.guest_phys(),
            memory_size: r.len(),
            userspace_addr: r.host_addr(),
        };
        // SAFETY: the mapping belongs to `memory`, which the test keeps
        // alive as long as the VM.
        unsafe { vm.set_user_memory_region(memslot) }.unwrap();
    }
    (vm, memory)
}

#[test]
fn logging_turns_on_and_off_on_vmm_registered_memslots() {
    if !kvm_available() {
        return;
    }
    let (vm, memory) = vmm_vm();
    let logging = DirtyLogging::start(&vm, memory.clone(), DirtyLogMode::ManualProtect).unwrap();
    if logging.mode() == DirtyLogMode::Legacy {
        eprintln!("SKIPPED: KVM offers no manual-protect dirty log, the on/off check needs it");
        return;
    }
    // Initially set: every page of every region reads dirty, then none once
    // cleared (no vCPU writes).
    for (i, r) in memory.regions().iter().enumerate() {
        let mut words = vec![0u64; r.bitmap_words()];
        logging.get(i, &mut words).unwrap();
        assert_eq!(count_dirty(&words), r.pages(), "region {}", r.name());
        logging.clear(i, 0, r.pages(), &words).unwrap();
        let mut after = vec![0u64; r.bitmap_words()];
        logging.get(i, &mut after).unwrap();
        assert_eq!(count_dirty(&after), 0, "region {}", r.name());
    }
    assert_eq!(logging.clear_calls(), 2);
    let mut short = vec![0u64; 1];
    assert_eq!(
        logging.get(0, &mut short),
        Err(DirtyLogError::BitmapTooSmall {
            needed: 4,
            given: 1
        })
    );
    assert_eq!(
        logging.get(2, &mut short),
        Err(DirtyLogError::NoSuchRegion(2))
    );
    logging.stop().unwrap();

    // Off means KVM dropped the slots' bitmaps: turning logging on again
    // starts from a fresh, initially-set bitmap (had the slots kept logging,
    // the re-registration would change nothing and the cleared bits stay
    // clear).
    let vm = Arc::new(vm);
    let again =
        DirtyLogging::start(Arc::clone(&vm), memory.clone(), DirtyLogMode::ManualProtect).unwrap();
    for (i, r) in memory.regions().iter().enumerate() {
        let mut words = vec![0u64; r.bitmap_words()];
        again.get(i, &mut words).unwrap();
        assert_eq!(count_dirty(&words), r.pages(), "region {}", r.name());
        again.clear(i, 0, r.pages(), &words).unwrap();
    }
    // Dropping the guard (an early return) turns logging off as well.
    drop(again);
    let third = DirtyLogging::start(vm, memory.clone(), DirtyLogMode::ManualProtect).unwrap();
    for (i, r) in memory.regions().iter().enumerate() {
        let mut words = vec![0u64; r.bitmap_words()];
        third.get(i, &mut words).unwrap();
        assert_eq!(count_dirty(&words), r.pages(), "region {}", r.name());
    }
    third.stop().unwrap();
}

#[test]
fn legacy_mode_refuses_clears() {
    if !kvm_available() {
        return;
    }
    let (vm, memory) = vmm_vm();
    let logging = DirtyLogging::start(&vm, memory, DirtyLogMode::Legacy).unwrap();
    assert_eq!(logging.mode(), DirtyLogMode::Legacy);
    let mut words = vec![0u64; 4];
    logging.get(0, &mut words).unwrap();
    assert_eq!(
        logging.clear(0, 0, 256, &words),
        Err(DirtyLogError::NotManualProtect)
    );
    logging.stop().unwrap();
}

#[test]
fn a_refused_memslot_turns_the_others_off_again() {
    if !kvm_available() {
        return;
    }
    let (vm, memory) = vmm_vm();
    // The VMM's low region as it is, and a region numbered as a memslot the
    // VMM never registered, over the guest-physical range of its slot 5:
    // KVM refuses to create a slot there.
    let low = &memory.regions()[0];
    // SAFETY: the very mapping of `memory`'s low region, kept alive by
    // `memory`, which the GuestMemory below owns a clone of.
    let same_low = unsafe {
        GuestRegion::new(
            low.name(),
            low.guest_phys(),
            low.host_addr() as *mut u8,
            low.len(),
            low.slot(),
        )
    }
    .unwrap();
    let other = GuestMemory::anonymous(&[RegionLayout {
        name: "clash".into(),
        guest_phys: 1 << 20,
        len: 100 * PAGE,
        slot: 6,
    }])
    .unwrap();
    let o = &other.regions()[0];
    // SAFETY: `other`'s own mapping, kept alive by the clone owned below.
    let clash = unsafe {
        GuestRegion::new(
            "clash",
            o.guest_phys(),
            o.host_addr() as *mut u8,
            o.len(),
            6,
        )
    }
    .unwrap();
    let wrong = GuestMemory::new(
        vec![same_low, clash],
        Some(Arc::new((memory.clone(), other.clone()))),
    )
    .unwrap();
    // Legacy logs start clean, so a slot left logging would keep a clean
    // bitmap through the next start.
    let refused = DirtyLogging::start(&vm, wrong, DirtyLogMode::Legacy).unwrap_err();
    assert!(
        matches!(
            refused,
            DirtyLogError::Memslot {
                slot: 6,
                on: true,
                ..
            }
        ),
        "{refused}"
    );
    let logging = DirtyLogging::start(&vm, memory.clone(), DirtyLogMode::ManualProtect).unwrap();
    if logging.mode() == DirtyLogMode::Legacy {
        eprintln!("SKIPPED: KVM offers no manual-protect dirty log, the check needs it");
        return;
    }
    // The low slot was turned off after the refusal: turning it on again
    // made a fresh, initially-set bitmap.
    let mut words = vec![0u64; low.bitmap_words()];
    logging.get(0, &mut words).unwrap();
    assert_eq!(count_dirty(&words), low.pages());
    logging.stop().unwrap();
}
