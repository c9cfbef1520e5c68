//! The demo VMM (rust-vmm crates, in-kernel irqchip and PIT, COM1, N vCPU
//! threads) runs the demo guest on its own: every vCPU stamps, vCPU 0
//! counts ~1 kHz timer ticks and writes a gap-free numbered line sequence
//! to COM1, pause_all stops all of it, resume_all restarts it, and COM1's
//! state moves into a second VMM as a device section. Skips loudly
//! without `/dev/kvm` (see `common::kvm_available`).

// Only some of the shared helpers are used here.
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::{json_of, kvm_available, livemig, small_ws_with_devices};
use livemig_cli::guest;
use livemig_cli::vmm::DemoVmm;
use livemig_kvm::vmm::{DeviceSection, Vcpus};

const MIB: u64 = 1 << 20;

/// Every counter the host can see: per-vCPU stamps, ticks.
fn counters(vmm: &DemoVmm, vcpus: u32) -> (Vec<u64>, u64) {
    let stamps = (0..vcpus)
        .map(|v| guest::stamped_by(vmm.guest_memory(), v).unwrap())
        .collect();
    (stamps, vmm.ticks().unwrap())
}

/// The complete lines of `out` as numbers, with the unfinished tail kept
/// in `out`; panics on a line that is not a number.
fn lines(out: &mut Vec<u8>) -> Vec<u64> {
    let end = out.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let done: Vec<u8> = out.drain(..end).collect();
    String::from_utf8(done)
        .expect("serial output is text")
        .lines()
        .map(|l| {
            l.parse()
                .unwrap_or_else(|_| panic!("serial line {l:?} is not a number"))
        })
        .collect()
}

#[test]
fn four_vcpus_stamp_tick_and_print_pause_stops_them_and_com1_moves() {
    if !kvm_available() {
        return;
    }
    const N: u32 = 4;
    let vmm = DemoVmm::new(64 * MIB, N).expect("demo VMM");
    vmm.boot(&small_ws_with_devices(N)).expect("boot");
    assert_eq!(vmm.vcpus().count(), N as usize);

    let started = Instant::now();
    vmm.vcpus().resume_all().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    vmm.vcpus().pause_all().unwrap();
    let ran_ms = started.elapsed().as_millis() as u64;
    assert_eq!(vmm.vcpus().stopped(), None);

    let (stamps, ticks) = counters(&vmm, N);
    eprintln!("MEASURE 4 vCPUs, {ran_ms} ms: stamps {stamps:?}, ticks {ticks}");
    for (v, &s) in stamps.iter().enumerate() {
        assert!(s > 0, "vCPU {v} stamped nothing: {stamps:?}");
        let r = vmm.vcpus().report(v).unwrap();
        assert_eq!(r.booted, Some(true), "vCPU {v}: {r:?}");
        assert!(r.mismatches.is_empty(), "vCPU {v}: {r:?}");
    }
    // About one tick a millisecond; boot (emulated ring 0) and a loaded
    // 2-core machine eat into it, so the margin is wide.
    assert!(
        (ran_ms * 3 / 10..=ran_ms * 12 / 10).contains(&ticks),
        "{ticks} ticks in {ran_ms} ms"
    );
    let mut out = vmm.serial().take_output();
    let seq = lines(&mut out);
    assert!(seq.len() >= 20, "{} serial lines in {ran_ms} ms", seq.len());
    assert!(
        seq.iter().copied().eq(0..seq.len() as u64),
        "serial sequence has a gap: {seq:?}"
    );
    // The guest's own count of lines agrees (it counts a line once its
    // newline is out, so it may be one behind).
    let next = vmm.read_u64(guest::SERIAL_SEQ_ADDR).unwrap();
    let written = seq.len() as u64;
    assert!(
        next == written || next + 1 == written,
        "guest counts {next} lines, {written} arrived"
    );

    // Every page of the working set holds the stamp its vCPU's counter
    // implies (each vCPU's page in progress is skipped).
    let check = guest::check_stamps(vmm.guest_memory()).unwrap();
    assert!(check.ok(), "{check:?}");
    assert_eq!(check.checked, 1024 - u64::from(N), "{check:?}");
    assert_eq!(check.stamped, stamps.iter().sum::<u64>());

    // Paused, each vCPU's fd is lent out, and each stands in the ring-3
    // workload: vCPU 0 may be in its tick handler (ring 0, and emulated,
    // so a pause lands there now and then).
    for v in 0..N as usize {
        let mut at = None;
        vmm.vcpus()
            .with_vcpu(v, &mut |fd| {
                at = Some((fd.get_sregs().unwrap().cs.dpl, fd.get_regs().unwrap().rip))
            })
            .unwrap();
        let (cpl, rip) = at.unwrap();
        assert!(
            cpl == 3 || (v == 0 && cpl == 0 && guest::RING0_HANDLERS.contains(&rip)),
            "vCPU {v} paused at CPL {cpl}, rip {rip:#x}"
        );
    }

    // Paused: nothing moves.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        counters(&vmm, N),
        (stamps.clone(), ticks),
        "counters moved while paused"
    );
    assert!(
        vmm.serial().take_output().is_empty(),
        "serial written while paused"
    );

    // Resumed: everything moves on, the sequence continues where it was.
    vmm.vcpus().resume_all().unwrap();
    assert!(
        vmm.vcpus().with_vcpu(0, &mut |_| ()).is_err(),
        "fd lent while running"
    );
    std::thread::sleep(Duration::from_millis(300));
    vmm.vcpus().pause_all().unwrap();
    let (stamps2, ticks2) = counters(&vmm, N);
    for v in 0..N as usize {
        assert!(
            stamps2[v] > stamps[v],
            "vCPU {v}: {stamps:?} then {stamps2:?}"
        );
    }
    eprintln!(
        "MEASURE after 200 ms paused and 300 ms run: ticks {ticks} then {ticks2}, {} ms since the first resume",
        started.elapsed().as_millis()
    );
    assert!(ticks2 > ticks, "ticks {ticks} then {ticks2}");
    out.extend(vmm.serial().take_output());
    let more = lines(&mut out);
    assert!(!more.is_empty(), "no serial line after resume");
    let from = seq.len() as u64;
    assert!(
        more.iter().copied().eq(from..from + more.len() as u64),
        "serial sequence after resume does not continue {from}: {more:?}"
    );

    // COM1's state (with a register the guest does not touch set, so the
    // round trip is visible) loads into a second VMM's COM1; that VMM, one
    // vCPU, then runs its own guest with it.
    vmm.serial().write(guest::PORT_SERIAL + 7, 0xa5).unwrap(); // scratch register
    let mut blob = Vec::new();
    vmm.serial().section().save(&mut blob).unwrap();
    let other = DemoVmm::new(16 * MIB, 1).expect("second demo VMM");
    let mut section = other.serial().section();
    assert_eq!((section.id(), section.version()), ("serial", 1));
    assert!(
        section.load(1, &blob[..blob.len() - 1]).is_err(),
        "a cut blob loads"
    );
    section.load(1, &blob).unwrap();
    assert_eq!(other.serial().state(), vmm.serial().state());
    assert_eq!(other.serial().read(guest::PORT_SERIAL + 7), 0xa5);

    other
        .boot(&small_ws_with_devices(1))
        .expect("boot one vCPU");
    other.vcpus().resume_all().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    other.vcpus().pause_all().unwrap();
    assert_eq!(other.vcpus().stopped(), None);
    let (stamps1, ticks1) = counters(&other, 1);
    assert!(
        stamps1[0] > 0 && ticks1 > 0,
        "one vCPU: {stamps1:?}, {ticks1} ticks"
    );
    let mut out1 = other.serial().take_output();
    let seq1 = lines(&mut out1);
    assert!(
        !seq1.is_empty() && seq1.iter().copied().eq(0..seq1.len() as u64),
        "one vCPU's serial sequence: {seq1:?}"
    );
}

#[test]
fn bad_shapes_are_refused_by_name() {
    if !kvm_available() {
        return;
    }
    for n in [0, 9] {
        let e = DemoVmm::new(64 * MIB, n).unwrap_err();
        assert!(e.to_string().contains(&format!("--vcpus {n}")), "{e}");
    }
    let e = DemoVmm::new(3 * MIB, 1).unwrap_err();
    assert!(e.to_string().contains("guest RAM"), "{e}");
    let vmm = DemoVmm::new(16 * MIB, 2).unwrap();
    let e = vmm.boot(&small_ws_with_devices(3)).unwrap_err();
    assert!(e.to_string().contains("name 3 vCPUs, the VMM has 2"), "{e}");
}

#[test]
fn livemig_run_boots_the_demo_vmm_on_the_vcpus_asked_for() {
    if !kvm_available() {
        return;
    }
    let out = livemig(&["run", "--vcpus", "3", "--run-ms", "500", "--json"]);
    let report = json_of(&out);
    assert!(out.status.success(), "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let vcpus = report["vcpus"].as_array().expect("vcpus");
    assert_eq!(vcpus.len(), 3, "{report}");
    assert!(
        vcpus.iter().all(|v| v["stamped"].as_u64() > Some(0)),
        "{report}"
    );
    assert!(report["ticks"].as_u64() > Some(0), "{report}");
    assert!(report["serial-lines"].as_u64() > Some(0), "{report}");
    // Out of range is refused by the parser, naming the flag.
    let out = livemig(&["run", "--vcpus", "9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vcpus"));
}
