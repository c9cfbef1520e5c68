//! `livemig bench` end to end, scaled down so it takes a few seconds: the
//! real migration and its raw TCP baselines run as separate processes, and
//! the output carries the ratio and the verdict. Skips loudly without
//! `/dev/kvm` (see `common::kvm_available`).

// Only the loud-skip and run helpers are used here; the VM helpers serve
// other tests.
#[allow(dead_code)]
mod common;

use common::{kvm_available, livemig};
use serde_json::Value;

/// A busy case shrunk to 256 MiB (16 MiB working set), one run, which must
/// succeed: what it printed on stdout.
fn small_bench(json: bool) -> String {
    let mut args = vec!["bench", "--case", "busy-1g", "--runs", "1"];
    args.extend(["--mem-mib-override", "256"]);
    args.extend(["--warmup-ms", "300", "--run-ms", "300"]);
    if json {
        args.push("--json");
    }
    let out = livemig(&args);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bench_reports_the_ratio_against_raw_tcp_and_verifies() {
    if !kvm_available() {
        return;
    }
    let text = small_bench(true);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object per case: {text:?}");
    let v: Value = serde_json::from_str(lines[0]).expect("valid JSON");
    eprintln!("MEASURE bench busy-1g at 256 MiB: {v}");
    assert_eq!(v["case"], "busy-1g");
    assert_eq!(
        (v["mem-mib"].as_u64(), v["dirty-mib"].as_u64()),
        (Some(256), Some(16))
    );
    assert_eq!(v["verified"], true);
    let run = &v["run-results"][0];
    assert_eq!(run["verified"], true, "{run}");
    // Verified in-protocol; no second digest of all RAM inside the stop.
    assert_eq!(run["destination-digest-time"], Value::Null, "{run}");
    assert_eq!(run["ram-total"], 256u64 << 20);
    // The working set alone is 16 MiB of non-zero pages.
    assert!(run["transferred"].as_u64().unwrap() > 16 << 20, "{run}");
    for key in ["migration-gbps", "raw-tcp-gbps", "ratio", "vs-all-ram"] {
        let median = v[key]["median"].as_f64();
        assert!(median.is_some_and(|x| x > 0.0), "{key}: {}", v[key]);
    }
    // The ratio is the run's own two throughputs, not a constant.
    let ratio = run["ratio"].as_f64().unwrap();
    let expect = run["migration-gbps"].as_f64().unwrap() / run["raw-tcp-gbps"].as_f64().unwrap();
    assert!((ratio - expect).abs() < 1e-9, "{run}");
    let raw_all = run["raw-all-ram-s"].as_f64().unwrap();
    assert!(raw_all > 0.0, "{run}");
}

#[test]
fn bench_table_has_the_ratio_column_and_the_verdict() {
    if !kvm_available() {
        return;
    }
    let text = small_bench(false);
    let mut lines = text.lines();
    let head = lines.next().unwrap_or_default();
    for column in [
        "case",
        "total ms",
        "downtime ms",
        "raw TCP GB/s",
        "ratio",
        "verified",
    ] {
        assert!(head.contains(column), "no {column:?} in {head:?}");
    }
    let row = lines.next().unwrap_or_default();
    assert!(row.starts_with("busy-1g"), "{row:?}");
    assert!(row.trim_end().ends_with("true"), "not verified: {row:?}");
}

#[test]
fn bench_flags_are_checked() {
    let out = livemig(&["bench", "--case", "warp-9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("warp-9"));
    let out = livemig(&["bench", "--runs", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("livemig: bench: --runs must be at least 1"),
        "{err}"
    );
}

/// `--case postcopy`, shrunk to 256 MiB: one JSON object with the pooled
/// percentiles (both baselines, the migration's requests) and the ratios
/// of their medians, and each round, its migration verified.
#[test]
fn postcopy_bench_reports_fault_latency_against_the_uffd_round_trip() {
    if !kvm_available() {
        return;
    }
    let out = livemig(&[
        "bench",
        "--case",
        "postcopy",
        "--runs",
        "1",
        "--mem-mib-override",
        "256",
        "--warmup-ms",
        "300",
        "--run-ms",
        "300",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object: {text:?}");
    let v: Value = serde_json::from_str(lines[0]).expect("valid JSON");
    eprintln!("MEASURE bench postcopy at 256 MiB: {v}");
    let runs = v["runs"].as_array().expect("the rounds");
    assert_eq!(runs.len(), 1, "{v}");
    let run = &runs[0];
    assert_eq!(
        (run["status"].as_str(), run["verified"].as_bool()),
        (Some("completed"), Some(true))
    );
    assert!(run["downtime"].as_f64().is_some_and(|d| d > 0.0), "{v}");
    let pooled = &v["pooled"];
    let median = |l: &Value| l["median-us"].as_f64().unwrap();
    let samples = |l: &Value| l["samples"].as_u64().unwrap();
    let (uffd, tcp) = (&pooled["uffd-round-trip"], &pooled["uffd-tcp-round-trip"]);
    assert!(median(uffd) > 0.0 && median(tcp) > 0.0, "{v}");
    assert_eq!((samples(uffd), samples(tcp)), (500, 500), "{v}");
    // The guest finds missing pages ahead of it on the destination: it
    // faults, and one round's requests are all the pooled ones.
    let fault = &pooled["fault-latency"];
    assert!(samples(fault) > 0, "{v}");
    assert_eq!(samples(fault), samples(&run["fault-latency"]), "{v}");
    assert!(fault["p99-us"].as_f64() >= fault["p90-us"].as_f64(), "{v}");
    let ratio = pooled["vs-uffd"].as_f64().unwrap();
    assert!((ratio - median(fault) / median(uffd)).abs() < 1e-9, "{v}");
    let ratio = pooled["vs-uffd-tcp"].as_f64().unwrap();
    assert!((ratio - median(fault) / median(tcp)).abs() < 1e-9, "{v}");
}
