//! The readings `demo` judges a migration by (`livemig_cli::watch`), over
//! one demo VMM: in a test binary of its own, so that its vCPUs do not
//! load the machine while `demo_vmm`'s tests pause theirs. Skips loudly
//! without `/dev/kvm` (see `common::kvm_available`).

#[allow(dead_code)]
mod common;

use std::time::Duration;

use common::{kvm_available, small_ws_with_devices};
use livemig_cli::vmm::DemoVmm;
use livemig_cli::watch::{GuestAfter, GuestAtStop};
use livemig_kvm::vmm::Vcpus;

const MIB: u64 = 1 << 20;

/// The readings `demo` judges a migration by, taken across a pause of one
/// VMM (the stop without the move): every vCPU, the timer and the serial
/// sequence go on, and a lost serial line is seen.
#[test]
fn the_guest_read_at_a_stop_and_after_it_shows_it_went_on() {
    if !kvm_available() {
        return;
    }
    const N: u32 = 2;
    let vmm = DemoVmm::new(16 * MIB, N).expect("demo VMM");
    vmm.boot(&small_ws_with_devices(N)).expect("boot");
    vmm.vcpus().resume_all().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    vmm.vcpus().pause_all().unwrap();
    let at_stop = GuestAtStop::read(&vmm).unwrap();
    assert_eq!(at_stop.stamped.len(), N as usize);
    assert!(
        !at_stop.serial.is_empty(),
        "no serial output before the stop"
    );
    vmm.vcpus().resume_all().unwrap();
    let after = GuestAfter::watch(&vmm, Duration::from_millis(300)).unwrap();
    let c = after.continuity(&at_stop);
    assert!(after.healthy(), "{after:?}");
    assert!(c.ok(), "{c:?}");
    assert_eq!((c.vcpus, c.vcpus_continued), (N, N), "{c:?}");
    assert!(after.continued(&at_stop));
    // The destination's output without its first line: a gap.
    let cut = after.serial.iter().position(|&b| b == b'\n').unwrap() + 1;
    let lost = GuestAfter {
        serial: after.serial[cut..].to_vec(),
        ..after.clone()
    };
    assert!(!lost.continuity(&at_stop).serial_continued);
    assert!(!lost.continued(&at_stop));
    // A stop image from later than the watch: no vCPU went on.
    let later = GuestAtStop {
        stamped: after.stamped.iter().map(|s| s + 1).collect(),
        ..at_stop.clone()
    };
    assert_eq!(after.continuity(&later).vcpus_continued, 0);
}
