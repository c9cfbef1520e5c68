//! `livemig bench --verify-cost` end to end, scaled down: the same case
//! verified and not, alternating, each way checked, and the ratios of the
//! medians. Skips loudly without `/dev/kvm` (see `common::kvm_available`).

// Only the loud-skip and run helpers are used here; the VM helpers serve
// other tests.
#[allow(dead_code)]
mod common;

use common::{kvm_available, livemig};
use serde_json::Value;

#[test]
fn verify_cost_runs_both_ways_checks_both_and_gives_the_ratios() {
    if !kvm_available() {
        return;
    }
    let out = livemig(&[
        "bench",
        "--case",
        "busy-1g",
        "--runs",
        "2",
        "--mem-mib-override",
        "256",
        "--warmup-ms",
        "300",
        "--run-ms",
        "300",
        "--verify-cost",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).expect("one JSON object");
    eprintln!(
        "MEASURE bench --verify-cost busy-1g at 256 MiB: {}",
        v["verify-cost"]
    );
    assert_eq!(v["verified"], true);
    for way in ["verify-on", "verify-off"] {
        let runs = v[way]["run-results"].as_array().expect("runs");
        assert_eq!(runs.len(), 2, "{way}");
        for run in runs {
            assert_eq!(run["verified"], true, "{way}: {run}");
            // Neither way digests all RAM inside the stop.
            assert_eq!(run["destination-digest-time"], Value::Null, "{way}: {run}");
        }
    }
    for figure in ["downtime", "total-time", "migration-gbps", "ratio"] {
        let f = &v["verify-cost"][figure];
        let (on, off) = (
            f["verify-on"]["median"].as_f64().expect("on"),
            f["verify-off"]["median"].as_f64().expect("off"),
        );
        let ratio = f["on-over-off"].as_f64().expect("ratio");
        assert!((ratio - on / off).abs() < 1e-9, "{figure}: {f}");
    }
}

#[test]
fn verify_cost_refuses_a_run_without_verification() {
    let out = livemig(&["bench", "--verify-cost", "--no-verify"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--no-verify"), "{err}");
}
