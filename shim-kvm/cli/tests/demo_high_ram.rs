//! `livemig demo` with guest RAM above the 32-bit hole: the demo VMM lays
//! a 4.5 GiB guest out as a PC does (3 GiB at 0, 1.5 GiB at 4 GiB, two
//! regions and memslots), the migration completes and verifies (the
//! destination's memory at load equals the source's at the stop, by
//! digest, both regions included) and the guest goes on there. Sizes
//! beyond the demo VMM's bound and working sets reaching into the hole
//! are refused in one line naming the limit. KVM tests skip loudly
//! without `/dev/kvm` (see `common::kvm_available`).

#[allow(dead_code)]
mod common;

use common::{demo, demo_ok, kvm_available, livemig, stderr};
use serde_json::json;

const GIB: u64 = 1 << 30;

#[test]
fn a_guest_with_ram_above_4_gib_migrates_and_goes_on() {
    if !kvm_available() {
        return;
    }
    let v = demo_ok(&[
        "--mem-mib",
        "4608",
        "--dirty-mib",
        "0",
        "--warmup-ms",
        "200",
        "--run-ms",
        "400",
    ]);
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["backend"], "kvm", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["guest-continued"], true, "{v}");
    assert!(v["digest"].is_string(), "{v}");
    assert_eq!(v["destination"]["digest"], v["digest"], "{v}");
    assert_eq!(
        v["guest-ram"],
        json!([[0, 3 * GIB], [4 * GIB, 3 * GIB / 2]]),
        "{v}"
    );
}

#[test]
fn ram_beyond_the_bound_and_working_sets_in_the_hole_are_refused() {
    if !kvm_available() {
        return;
    }
    let out = demo(&["--mem-mib", "16385", "--dirty-mib", "0"]);
    assert!(!out.status.success(), "{out:?}");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("at most 16384 MiB"), "{err}");

    let out = livemig(&["run", "--mem-mib", "16385", "--dirty-mib", "0"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr(&out).contains("at most 16384 MiB"), "{out:?}");

    // 4 GiB of RAM has 3 GiB below the hole: a 3100 MiB working set at
    // 2 MiB would end in it.
    let out = demo(&["--mem-mib", "4096", "--dirty-mib", "3100"]);
    assert!(!out.status.success(), "{out:?}");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("3072 MiB of RAM below the 32-bit hole"),
        "{err}"
    );
}
