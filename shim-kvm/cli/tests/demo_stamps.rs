//! `livemig demo` with a working set too large to be rewritten on the
//! destination within its watch. In a test binary of its own: its two
//! 1 GiB guests, run beside the other CLI tests on this 2-core machine,
//! starve them (the postcopy demo then barely faults).

#[allow(dead_code)]
mod common;

use common::{demo_ok, kvm_available};

/// A working set too large for the guest to stamp a whole generation of it
/// on the destination within `--run-ms` (every first touch of a page there
/// costs microseconds): the guest continued, which its stamp counter and
/// stamps show, so the demo verifies and exits 0 (it used to wait for a
/// whole generation and report a correct migration as failed).
#[test]
fn demo_whose_working_set_outlasts_the_run_verifies_by_its_stamps() {
    if !kvm_available() {
        return;
    }
    // About 1 300 pages stamped in 30 ms against 131 072: the stop has to
    // fall in the last 1% of a generation for the destination to finish it.
    // What is tested is the verdict, not the stop: the limit leaves room
    // for the 512 MiB working set and the destination's digest of it
    // (about 250 ms of the fixed cost alone), which 300 ms does not.
    let v = demo_ok(&[
        "--param",
        "downtime-limit=2000",
        "--mem-mib",
        "1024",
        "--dirty-mib",
        "512",
        "--warmup-ms",
        "300",
        "--run-ms",
        "30",
    ]);
    eprintln!("MEASURE demo 1 GiB / 512 MiB, 30 ms on the destination: {v}");
    let dest = &v["destination"];
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["guest-continued"], true, "{v}");
    assert_eq!(dest["guest-stamps"]["wrong"], 0, "{v}");
    // The destination's vCPU threads count the generations completed on
    // it: with none, only the stamp counters can show the guest went on,
    // which is what the rest checks. Since the guest has two vCPUs a
    // generation sometimes completes on the destination (not understood
    // yet: about one run in three on this machine); the run then says so
    // and the stamp-only checks below do not apply.
    if dest["guest-generation"] != 0 {
        eprintln!(
            "demo_stamps: NOT TESTED this run: {} generations completed on the destination, \
             so the verdict did not rest on the stamp counters alone",
            dest["guest-generation"]
        );
        return;
    }
    let (before, after) = (
        v["guest-stamped-at-stop"].as_array().unwrap(),
        dest["guest-stamped"].as_array().unwrap(),
    );
    assert_eq!(before.len(), 2, "{v}");
    for (b, a) in before.iter().zip(after) {
        assert!(a.as_u64() > b.as_u64(), "{before:?} -> {after:?}");
    }
    assert_eq!(v["guest"]["vcpus-continued"], 2, "{v}");
    // Every page but the one each of the two vCPUs was stamping.
    assert_eq!(dest["guest-stamps"]["checked"], 512 * 256 - 2, "{v}");
}
