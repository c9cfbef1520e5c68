//! `livemig demo` on the demo VMM with N vCPUs: the migration completes
//! and verifies (destination memory at load equals the source's at the
//! stop, by digest), and the `"guest"` object shows every vCPU's stamp
//! counter, the timer and the serial sequence going on on the
//! destination. Out-of-range vCPU counts are refused by every command.
//! KVM tests skip loudly without `/dev/kvm` (see `common::kvm_available`).

#[allow(dead_code)]
mod common;

use common::{demo_ok, kvm_available, livemig, stderr, userfaultfd_available};
use serde_json::Value;

/// A small guest: 64 MiB of RAM, a 4 MiB working set shared by the vCPUs.
const SMALL: [&str; 8] = [
    "--mem-mib",
    "64",
    "--dirty-mib",
    "4",
    "--warmup-ms",
    "300",
    "--run-ms",
    "400",
];

/// The summary of a completed, verified demo whose guest went on, on
/// `vcpus` vCPUs.
fn assert_guest_went_on(v: &Value, vcpus: u64) {
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["backend"], "kvm", "{v}");
    // After a postcopy the pages the destination guest did not write are
    // compared, else all of memory at load.
    let digest = if v["postcopy"] == true {
        "digest-unwritten"
    } else {
        "digest"
    };
    assert!(v[digest].is_string(), "{v}");
    assert_eq!(v["destination"][digest], v[digest], "{v}");
    let g = &v["guest"];
    assert_eq!(g["vcpus"], vcpus, "{v}");
    assert_eq!(g["vcpus-continued"], vcpus, "{v}");
    let (at_stop, after) = (
        g["ticks-at-stop"].as_u64().expect("ticks-at-stop"),
        g["ticks-after"].as_u64().expect("ticks-after"),
    );
    assert!(after > at_stop, "ticks {at_stop} then {after}: {v}");
    assert_eq!(g["serial-continued"], true, "{v}");
    let started = v["vcpu-started-ns"].as_u64().expect("vcpu-started-ns");
    let stopped = v["vcpu-stopped-ns"].as_u64().expect("vcpu-stopped-ns");
    assert!(started > stopped, "destination started before the stop");
}

fn demo_with(extra: &[&str]) -> Value {
    let args: Vec<&str> = SMALL.iter().chain(extra).copied().collect();
    demo_ok(&args)
}

#[test]
fn four_vcpus_migrate_and_each_goes_on() {
    if !kvm_available() {
        return;
    }
    let v = demo_with(&["--vcpus", "4"]);
    eprintln!("MEASURE demo --vcpus 4: {v}");
    assert_guest_went_on(&v, 4);
}

#[test]
fn one_vcpu_migrates_and_goes_on() {
    if !kvm_available() {
        return;
    }
    let v = demo_with(&["--vcpus", "1"]);
    assert_guest_went_on(&v, 1);
}

#[test]
fn two_vcpus_in_postcopy_migrate_and_go_on() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    let v = demo_with(&["--mode", "postcopy", "--vcpus", "2"]);
    eprintln!("MEASURE demo --mode postcopy --vcpus 2: {v}");
    assert_eq!(v["postcopy"], true, "{v}");
    assert_guest_went_on(&v, 2);
}

#[test]
fn the_text_summary_says_the_same_in_words() {
    if !kvm_available() {
        return;
    }
    let args: Vec<&str> = ["demo", "--quiet", "--vcpus", "2"]
        .iter()
        .chain(SMALL.iter())
        .copied()
        .collect();
    let out = livemig(&args);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("verified             true"), "{text}");
    let guest = text
        .lines()
        .find(|l| l.starts_with("guest "))
        .unwrap_or_else(|| panic!("no guest line in {text}"));
    assert!(guest.contains("2 of 2 vCPUs continued"), "{guest}");
    assert!(guest.ends_with("serial sequence continued"), "{guest}");
}

#[test]
fn a_vcpu_count_outside_one_to_eight_is_refused_by_every_command() {
    for n in ["0", "9"] {
        for args in [
            vec!["demo", "--vcpus", n],
            vec!["send", "--to", "tcp:127.0.0.1:1", "--vcpus", n],
            vec!["receive", "--listen", "tcp:127.0.0.1:0", "--vcpus", n],
            vec!["bench", "--vcpus", n],
            vec!["run", "--vcpus", n],
        ] {
            let out = livemig(&args);
            assert!(!out.status.success(), "{args:?} accepted: {out:?}");
            let err = stderr(&out);
            assert!(
                err.contains("--vcpus") && err.contains("1..=8"),
                "{args:?}: {err}"
            );
            assert!(out.stdout.is_empty(), "{args:?} printed {out:?}");
        }
    }
}
