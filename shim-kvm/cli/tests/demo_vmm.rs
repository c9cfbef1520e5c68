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

/// An idle guest halts, as a real one does, instead of spinning: paused
/// at any moment, an idle vCPU is almost always halted (mp_state HALTED)
/// in its ring-0 `sti; hlt` path, and its wake-ups (its LAPIC timer;
/// vCPU 0's PIT too) still bring PROGRESS exits, the timer ticks and the
/// serial lines. A spinning idle loop is never seen halted.
#[test]
fn idle_vcpus_halt_in_ring0_and_wake_on_their_timers() {
    if !kvm_available() {
        return;
    }
    const N: u32 = 2;
    const SAMPLES: usize = 8;
    let vmm = DemoVmm::new(64 * MIB, N).expect("demo VMM");
    let params = guest::GuestParams {
        ws_pages: 0,
        idle_wakes: 1,
        ..small_ws_with_devices(N)
    };
    vmm.boot(&params).expect("boot");
    // Boot runs in ring 0 (emulated, slow): sample only once every vCPU
    // reached its ring-3 idle loop.
    vmm.vcpus().resume_all().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (0..N as usize).any(|v| vmm.vcpus().report(v).unwrap().booted.is_none()) {
        assert!(Instant::now() < deadline, "the idle guest did not boot");
        std::thread::sleep(Duration::from_millis(10));
    }
    vmm.vcpus().pause_all().unwrap();
    let mut halted = [0usize; N as usize];
    let mut in_ring0 = [0usize; N as usize];
    for sample in 0..SAMPLES {
        vmm.vcpus().resume_all().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        vmm.vcpus().pause_all().unwrap();
        assert_eq!(vmm.vcpus().stopped(), None);
        for v in 0..N as usize {
            let mut at = None;
            vmm.vcpus()
                .with_vcpu(v, &mut |fd| {
                    at = Some((
                        fd.get_mp_state().unwrap().mp_state,
                        fd.get_sregs().unwrap().cs.dpl,
                        fd.get_regs().unwrap().rip,
                    ))
                })
                .unwrap();
            let (mp_state, cpl, rip) = at.unwrap();
            assert!(
                cpl == 3 || (cpl == 0 && guest::RING0_HANDLERS.contains(&rip)),
                "sample {sample}: vCPU {v} paused at CPL {cpl}, rip {rip:#x}"
            );
            if mp_state == kvm_bindings::KVM_MP_STATE_HALTED {
                assert_eq!(cpl, 0, "vCPU {v} halted in ring 3");
                halted[v] += 1;
            }
            if cpl == 0 {
                in_ring0[v] += 1;
            }
        }
    }
    // Woken, each went round its loop: 80 wake-ups of vCPU 1's timer in
    // the 800 ms it ran, more of vCPU 0's (the PIT too), each an exit;
    // a few suffice on a loaded machine.
    for v in 0..N as usize {
        let r = vmm.vcpus().report(v).unwrap();
        assert!(r.progress_exits >= 4, "vCPU {v}: {r:?}");
    }
    // vCPU 1 runs a few microseconds per wake-up, 100 times a second:
    // nearly every pause finds it halted; half the samples leaves room
    // for a slow machine. vCPU 0's PIT ticks on while it is paused or
    // descheduled and KVM re-injects every tick it missed, so on a loaded
    // machine a pause mostly finds it catching up (just woken, RUNNABLE at
    // the `iretq` after its `hlt` with a tick pending, or in ring 3
    // writing a serial line): it is only asked to be seen in its ring-0
    // idle path once, where a spinning loop never is.
    assert!(
        halted[1] >= SAMPLES / 2,
        "vCPU 1 halted in {} of {SAMPLES} pauses",
        halted[1]
    );
    assert!(
        in_ring0[0] > 0,
        "vCPU 0 was in ring 0 in none of {SAMPLES} pauses (halted in {})",
        halted[0]
    );
    assert!(vmm.ticks().unwrap() > 0, "the PIT woke no one");
    let mut out = vmm.serial().take_output();
    let seq = lines(&mut out);
    assert!(
        !seq.is_empty() && seq.iter().copied().eq(0..seq.len() as u64),
        "serial sequence: {seq:?}"
    );
}
