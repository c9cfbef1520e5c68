//! The `downtime-breakdown` object of the JSON summaries: where the stop
//! went, in milliseconds.
//!
//! The source's parts ([`StopPart`]) tile its downtime, the vCPU stop to
//! the destination's confirmation (`source-downtime`). The destination's
//! parts ([`DESTINATION_PARTS`]) tile its own share, from the end of the
//! stream read to its vCPUs started; with the source's they overlap in the
//! end-of-stream exchange. `demo` nests the destination's object under
//! `destination`.

use livemig_kvm::migrate::DestinationReport;
use livemig_kvm::migrate::source::{SourceStop, StopPart};
use serde_json::{Map, Value, json};

/// The destination's parts, in order: the end of the stream read (and,
/// with the return path, LOADED answered) to the COMMIT received and
/// answered; the memory digest; starting the vCPUs.
pub const DESTINATION_PARTS: [&str; 3] = ["commit", "digest", "vcpu-start"];

/// Milliseconds with three decimals.
fn ms(ns: f64) -> Value {
    json!((ns / 1e3).round() / 1e3)
}

/// The source's breakdown: each part that the stop reached, and the counts
/// of what it sent.
pub fn source(stop: &SourceStop) -> Value {
    let mut obj = Map::new();
    for part in StopPart::ALL {
        if let Some(ns) = stop.part_ns(part) {
            obj.insert(part.name().into(), ms(ns as f64));
        }
    }
    if stop.pages_sent_ns.is_some() {
        obj.insert("final-pages-count".into(), json!(stop.final_pages));
        obj.insert("final-pages-bytes".into(), json!(stop.final_page_bytes));
    }
    if stop.devices_sent_ns.is_some() {
        obj.insert("device-state-bytes".into(), json!(stop.device_bytes));
    }
    if let Some(errno) = stop.priority_refused {
        let why = std::io::Error::from_raw_os_error(errno).to_string();
        obj.insert("stop-priority-refused".into(), json!(why));
    }
    Value::Object(obj)
}

/// The destination's breakdown, when it loaded the stream and started the
/// guest (a guest that arrives paused has no stop to divide).
pub fn destination(report: &DestinationReport) -> Option<Value> {
    let end = report.end_received_ns?;
    let loaded = report.loaded_ns?;
    let started = report.started_ns?;
    let digest_ns = report.digest_ms * 1e6;
    let digested = loaded as f64 + digest_ns;
    let parts = [
        loaded.saturating_sub(end) as f64,
        digest_ns,
        (started as f64 - digested).max(0.0),
    ];
    let obj: Map<String, Value> = DESTINATION_PARTS
        .iter()
        .zip(parts)
        .map(|(name, ns)| ((*name).into(), ms(ns)))
        .collect();
    Some(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_parts_reached_are_reported() {
        let stop = SourceStop {
            requested_ns: Some(0),
            paused_ns: Some(1_500_000),
            synced_ns: Some(2_000_000),
            ..SourceStop::default()
        };
        let v = source(&stop);
        assert_eq!(v["vcpu-stop"], 1.5);
        assert_eq!(v["final-sync"], 0.5);
        assert!(v.get("final-pages").is_none());
        assert!(v.get("final-pages-count").is_none());
    }
}
