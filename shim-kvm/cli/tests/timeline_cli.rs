//! `demo --timeline` on KVM: the SVG parses, has its series, one sync line
//! per dirty-log sync the summary reports and the stop; and the summary's
//! `downtime-breakdown` has every part, none negative, adding up to no
//! more than the downtime it divides. Skips loudly without `/dev/kvm`
//! (see `common::kvm_available`).

// Only some of the shared helpers are used here.
#[allow(dead_code)]
mod common;

use common::{demo_ok, kvm_available};
use livemig_cli::breakdown::DESTINATION_PARTS;
use livemig_cli::timeline::{SYNC_RGB, THROTTLE_RGB};
use livemig_kvm::migrate::source::StopPart;
use serde_json::Value;

/// The breakdown's figures are rounded to 1 µs each: a sum of `n` of them
/// is off by at most `n` / 2 µs from the sum of the exact parts. The parts
/// share their instants (each starts where the one before it ends), so no
/// other slack is needed.
fn rounding_ms(parts: usize) -> f64 {
    parts as f64 * 0.0005 + 1e-9
}

/// The parts `names` of `obj`: each present and non-negative; returns
/// their sum.
fn sum_of(obj: &Value, names: &[&str]) -> f64 {
    names
        .iter()
        .map(|n| {
            let ms = obj[*n]
                .as_f64()
                .unwrap_or_else(|| panic!("breakdown part {n} missing in {obj}"));
            assert!(ms >= 0.0, "breakdown part {n} is negative: {obj}");
            ms
        })
        .sum()
}

#[test]
fn demo_timeline_draws_every_sync_and_the_stop_and_the_breakdown_adds_up() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("livemig-timeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("demo.svg");
    let v = demo_ok(&[
        "--mem-mib",
        "256",
        "--dirty-mib",
        "16",
        "--warmup-ms",
        "300",
        "--run-ms",
        "300",
        // Held to 32 MiB/s, the ~20 MiB to send take several 100 ms slices
        // (unlimited, it takes ~150 ms now that untouched RAM is skipped:
        // two slices), and the stop of a 16 MiB working set fits.
        "--param",
        "max-bandwidth=32M",
        "--param",
        "downtime-limit=1000",
        "--timeline",
        svg.to_str().unwrap(),
    ]);
    eprintln!("MEASURE demo --timeline 256 MiB / 16 MiB: {v}");
    // Integrity: destination memory equals the source's at the stop, and
    // the guest went on there.
    assert_eq!(v["status"], "completed");
    assert_eq!(v["verified"], true);
    assert_eq!(v["destination"]["digest"], v["digest"]);
    assert_eq!(v["guest-continued"], true);

    let b = &v["downtime-breakdown"];
    let source: Vec<&str> = StopPart::ALL.iter().map(|p| p.name()).collect();
    let source_sum = sum_of(b, &source);
    let source_downtime = v["source-downtime"].as_f64().unwrap();
    assert!(
        source_sum <= source_downtime + rounding_ms(source.len() + 1),
        "source parts {source_sum} ms exceed the source downtime {source_downtime} ms: {b}"
    );
    // The parts tile it: they are not just below it but equal to it.
    assert!(
        source_downtime - source_sum <= rounding_ms(source.len() + 1),
        "source parts {source_sum} ms leave part of {source_downtime} ms out: {b}"
    );
    let dest_sum = sum_of(&b["destination"], &DESTINATION_PARTS);
    let downtime = v["downtime"].as_f64().unwrap();
    assert!(
        dest_sum <= downtime + rounding_ms(DESTINATION_PARTS.len() + 1),
        "destination parts {dest_sum} ms exceed the downtime {downtime} ms: {b}"
    );
    assert!(b["final-pages-count"].as_u64().is_some(), "{b}");
    assert!(b["final-pages-bytes"].as_u64().is_some(), "{b}");
    assert!(b["device-state-bytes"].as_u64().unwrap() > 0, "{b}");

    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("the timeline is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or_default().trim().to_string())
        .collect();
    for label in [
        "throughput (bytes sent per slice)",
        "dirty rate",
        "remaining (dirty, still to send)",
        "switchover threshold (fits the downtime limit)",
        "MiB/s",
        "MiB (log scale)",
        "seconds since the migration started",
        "throttle (right axis)",
        "throttle, % of vCPU time",
    ] {
        assert!(
            texts.iter().any(|t| t == label),
            "no {label:?} in the timeline's texts {texts:?}"
        );
    }
    assert!(
        texts.iter().any(|t| t.starts_with("stop (")),
        "no stop label in {texts:?}"
    );
    // Each sync is one grey line in each of the two panels.
    let grey = format!("#{:02X}{:02X}{:02X}", SYNC_RGB.0, SYNC_RGB.1, SYNC_RGB.2);
    let sync_lines = doc
        .descendants()
        .filter(|n| {
            n.has_tag_name("polyline")
                && n.attribute("stroke")
                    .is_some_and(|s| s.eq_ignore_ascii_case(&grey))
        })
        .count() as u64;
    let syncs = v["ram"]["dirty-sync-count"].as_u64().unwrap();
    assert!(syncs >= 2, "a setup and a final sync at least: {v}");
    assert_eq!(sync_lines, 2 * syncs, "sync lines vs {syncs} syncs");
    // Throughput (blue), remaining (black) and threshold (green): a line
    // through every slice each (the legend's samples have two points).
    let slices = |stroke: &str| {
        doc.descendants()
            .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(stroke))
            .map(|n| {
                n.attribute("points")
                    .unwrap_or_default()
                    .split_whitespace()
                    .count()
            })
            .max()
            .unwrap_or(0)
    };
    for stroke in ["#0000FF", "#000000", "#00963C"] {
        assert!(slices(stroke) >= 3, "no series drawn in {stroke}");
    }
    // The throttle is a step line: its start, two points per change, its
    // end; a migration that throttled has changed it at least twice (up,
    // and lifted).
    let orange = format!(
        "#{:02X}{:02X}{:02X}",
        THROTTLE_RGB.0, THROTTLE_RGB.1, THROTTLE_RGB.2
    );
    let steps = slices(&orange);
    if v["throttle"]["peak-percent"].as_u64().unwrap() > 0 {
        assert!(steps >= 6, "a throttled run drawn with {steps} points: {v}");
    } else {
        assert_eq!(steps, 2, "an unthrottled run is one flat line: {v}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--timeline-slice-ms`: an unlimited migration of a fraction of a second
/// drawn in 5 ms slices has a point per slice of its whole time, not the
/// two or three of the default 100 ms, and the title says the width.
#[test]
fn demo_timeline_in_5_ms_slices_has_a_point_per_slice() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("livemig-timeline-5ms-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("demo.svg");
    let v = demo_ok(&[
        "--mem-mib",
        "256",
        "--dirty-mib",
        "16",
        "--warmup-ms",
        "300",
        "--run-ms",
        "300",
        "--timeline",
        svg.to_str().unwrap(),
        "--timeline-slice-ms",
        "5",
    ]);
    assert_eq!(v["status"], "completed");
    assert_eq!(v["verified"], true);
    assert_eq!(v["guest-continued"], true);
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("the timeline is well-formed XML");
    assert!(
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .any(|n| n.text().unwrap_or_default().contains("per 5 ms slice")),
        "no 5 ms title"
    );
    let points = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some("#0000FF"))
        .map(|n| {
            n.attribute("points")
                .unwrap_or_default()
                .split_whitespace()
                .count()
        })
        .max()
        .unwrap_or(0);
    // Slices run from the first sample to the last, which is at most a
    // slice or two short of the total time (its setup and the stop).
    let total_ms = v["total-time"].as_f64().unwrap();
    let expected = (total_ms / 5.0).floor() as usize;
    assert!(
        points + 3 >= expected && points <= expected + 3,
        "{points} points for {total_ms} ms in 5 ms slices"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
