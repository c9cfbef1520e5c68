//! What the `livemig` tool shows: a live progress line while a migration
//! runs, and a final summary as text or as one JSON object.
//!
//! The JSON uses the field names of QEMU's `query-migrate` (`total-time`,
//! `ram.normal-bytes`, ...) so scripts written against QEMU read it
//! unchanged; livemig's own verdicts (`verified`, `dirty-log-clears`, ...)
//! sit beside them.

use std::io::{IsTerminal, Write};

use livemig_core::digest::Verification;
use livemig_core::stats::MigrationStats;
use livemig_core::status::MigrationStatus;
use serde_json::{Map, Value, json};

use crate::continuity::GuestContinuity;
use crate::timeline::Chart;
use livemig_kvm::clock;

const MIB: f64 = (1u64 << 20) as f64;

/// The progress line on stderr, redrawn in place at most ten times a
/// second, and only when stderr is a terminal (a log file gets no `\r`
/// noise).
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    drawn: bool,
    last_ns: u64,
}

impl Progress {
    /// A progress line that draws when stderr is a terminal.
    pub fn new() -> Self {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            drawn: false,
            last_ns: 0,
        }
    }

    /// A progress line that never draws.
    pub fn quiet() -> Self {
        Progress {
            enabled: false,
            drawn: false,
            last_ns: 0,
        }
    }

    /// Redraws the line from `stats` if a tenth of a second has passed.
    pub fn update(&mut self, stats: &MigrationStats) {
        if !self.enabled {
            return;
        }
        let now = clock::monotonic_ns();
        if self.drawn && now.saturating_sub(self.last_ns) < 100_000_000 {
            return;
        }
        self.last_ns = now;
        self.drawn = true;
        let mut err = std::io::stderr().lock();
        // A failed write to the terminal is not worth failing a migration.
        let _ = write!(err, "\r\x1b[K{}", progress_line(stats));
        let _ = err.flush();
    }

    /// Ends the line so that what follows starts on a fresh one.
    pub fn finish(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// One line: state, transferred, remaining, throughput, dirty rate, pass,
/// the stop a switchover now would take and the throttle in force: an
/// operator whose precopy does not converge sees why (a stop over the
/// limit) and what is done about it (the throttle rising).
pub fn progress_line(s: &MigrationStats) -> String {
    format!(
        "{:<10} transferred {:>9.1} MiB  remaining {:>8.1} MiB  {:>8.0} mbps  dirty {:>8} pages/s  iteration {}  stop ~{} ms  throttle {} %",
        s.status.as_str(),
        s.ram.transferred as f64 / MIB,
        s.ram.remaining as f64 / MIB,
        s.ram.mbps,
        s.ram.dirty_pages_rate,
        s.iterations,
        s.expected_downtime_ms,
        s.throttle.percent
    )
}

/// The end of a migration as the tool reports it.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The source's statistics (the destination's for `receive`).
    pub stats: MigrationStats,
    /// Milliseconds from the source's vCPU stop to the destination's vCPU
    /// start, when both ends are known; else the source's view.
    pub downtime_ms: Option<f64>,
    /// Milliseconds from the source's vCPU stop to the destination's
    /// confirmation of the last byte.
    pub source_downtime_ms: Option<f64>,
    /// `CLOCK_MONOTONIC` ns of the source's vCPU stop.
    pub vcpu_stopped_ns: Option<u64>,
    /// `CLOCK_MONOTONIC` ns of the destination's vCPU start.
    pub vcpu_started_ns: Option<u64>,
    /// Destination memory equals the source's at stop, and the guest ran
    /// on without reporting a mismatch.
    pub verified: bool,
    /// `KVM_CLEAR_DIRTY_LOG` calls made.
    pub dirty_log_clears: u64,
    /// How the dirty log was read ("manual-protect", "get-and-clear",
    /// "simulated").
    pub dirty_log_mode: String,
    /// Where the guest ran: "kvm" or "simulated".
    pub backend: String,
    /// Memory digest, when this side took one.
    pub digest: Option<u64>,
    /// Why the migration failed, when it did.
    pub error: Option<String>,
    /// Whether the guest went on after the migration, when one side saw
    /// both ends (`demo`): the JSON's `"guest"` object.
    pub guest: Option<GuestContinuity>,
    /// Further role-specific fields for the JSON object.
    pub extra: Map<String, Value>,
    /// The source's timeline and stop, for `--timeline` (a KVM source's
    /// summary only).
    pub timeline: Option<Chart>,
}

/// The migration's self-check as the JSON's `verification`: `"off"`,
/// `"pending"` (no verdict reached this side), `"verified"`, or an object
/// naming the first mismatching block and page (`page` null where the
/// page could not be located: without the return path, over multifd, in
/// postcopy).
pub fn verification_json(v: Verification) -> Value {
    match v {
        Verification::Off => json!("off"),
        Verification::Pending => json!("pending"),
        Verification::Verified => json!("verified"),
        Verification::Mismatch { block, page } => {
            json!({"mismatch": {"block": block, "page": page}})
        }
        Verification::AuditFailed { block, page } => {
            json!({"audit-failed": {"block": block, "page": page}})
        }
    }
}

fn verification_text(v: Verification) -> String {
    match v {
        Verification::Off => "off".into(),
        Verification::Pending => "pending (no verdict on this side)".into(),
        Verification::Verified => "verified (digests equal)".into(),
        Verification::Mismatch {
            block,
            page: Some(page),
        } => format!("MISMATCH at page {page} of RAM block {block}"),
        Verification::Mismatch { block, page: None } => format!("MISMATCH in RAM block {block}"),
        Verification::AuditFailed { block, page } => {
            format!("AUDIT FAILED at page {page} of RAM block {block}")
        }
    }
}

impl Summary {
    /// The summary as one JSON object, with `query-migrate` names.
    pub fn to_json(&self) -> Value {
        let s = &self.stats;
        let r = &s.ram;
        let mut v = json!({
            "status": s.status.as_str(),
            "total-time": s.total_time_ms,
            "setup-time": s.setup_time_ms,
            "expected-downtime": s.expected_downtime_ms,
            "ram": {
                "transferred": r.transferred,
                "remaining": r.remaining,
                "total": r.total,
                "duplicate": r.duplicate,
                "unpopulated": r.unpopulated,
                "normal": r.normal,
                "normal-bytes": r.normal_bytes,
                "mbps": (r.mbps * 1000.0).round() / 1000.0,
                "dirty-pages-rate": r.dirty_pages_rate,
                "dirty-sync-count": r.dirty_sync_count,
                "pages-per-second": r.pages_per_second,
                "postcopy-requests": r.postcopy_requests,
                "multifd-bytes": r.multifd_bytes,
                "page-size": r.page_size,
            },
            "iterations": s.iterations,
            "postcopy-recoveries": s.postcopy_recoveries,
            "postcopy-preempt-pages": s.postcopy_preempt_pages,
            "postcopy-refetched-pages": s.postcopy_refetched,
            "catch-up-ms": s.catch_up_ms.map(|ms| (ms * 1000.0).round() / 1000.0),
            "cpu-throttle-percentage": s.throttle.percent,
            "throttle": {
                "peak-percent": s.throttle.peak_percent,
                "throttle-ms": (s.throttle.throttled_ms * 1000.0).round() / 1000.0,
                "taken-ms": (s.throttle.taken_ms * 1000.0).round() / 1000.0,
            },
            "verified": self.verified,
            "dirty-log-clears": self.dirty_log_clears,
            "dirty-log-mode": self.dirty_log_mode,
            "backend": self.backend,
        });
        let Some(obj) = v.as_object_mut() else {
            return v;
        };
        let ms = |x: f64| json!((x * 1000.0).round() / 1000.0);
        obj.insert("downtime".into(), self.downtime().map_or(Value::Null, ms));
        if let Some(d) = self.source_downtime_ms {
            obj.insert("source-downtime".into(), ms(d));
        }
        if let Some(t) = self.vcpu_stopped_ns {
            obj.insert("vcpu-stopped-ns".into(), json!(t));
        }
        if let Some(t) = self.vcpu_started_ns {
            obj.insert("vcpu-started-ns".into(), json!(t));
        }
        if let Some(d) = self.digest {
            obj.insert("digest".into(), json!(format!("{d:#018x}")));
        }
        obj.insert("verification".into(), verification_json(s.verification));
        if let Some(e) = self.error_desc() {
            obj.insert("error-desc".into(), json!(e));
        }
        if let Some(end) = s.ambiguous_end {
            // livemig's own: the commit handshake was cut; the guest is
            // paused on this side and the operator decides.
            obj.insert("ambiguous-end".into(), json!(end.name()));
            obj.insert("operator-action".into(), json!(end.advice()));
        }
        if let Some(g) = &self.guest {
            obj.insert("guest".into(), g.to_json());
        }
        for (k, val) in &self.extra {
            obj.insert(k.clone(), val.clone());
        }
        v
    }

    /// The downtime in milliseconds: this tool's measure, else the engine's.
    /// A migration that did not complete has none (the guest was not moved,
    /// or was lost), which the JSON shows as `null`.
    pub fn downtime(&self) -> Option<f64> {
        if self.stats.status != MigrationStatus::Completed {
            return None;
        }
        self.downtime_ms
            .or(self.stats.downtime_ms.map(|d| d as f64))
    }

    /// Why the migration failed: the tool's words, else the engine's.
    pub fn error_desc(&self) -> Option<String> {
        self.error.clone().or_else(|| {
            let d = self.stats.error_desc.as_str();
            (!d.is_empty()).then(|| d.to_string())
        })
    }

    /// The summary as a few lines of text for a person.
    pub fn to_text(&self) -> String {
        let s = &self.stats;
        let r = &s.ram;
        let mut out = String::new();
        let line = |out: &mut String, k: &str, v: String| {
            out.push_str(&format!("{k:<20} {v}\n"));
        };
        line(&mut out, "status", s.status.as_str().to_string());
        if let Some(e) = self.error_desc() {
            line(&mut out, "error", e);
        }
        if let Some(end) = s.ambiguous_end {
            line(
                &mut out,
                "ambiguous end",
                format!("{}: {}", end.name(), end.advice()),
            );
        }
        line(&mut out, "backend", self.backend.clone());
        line(&mut out, "verification", verification_text(s.verification));
        line(&mut out, "total time", format!("{} ms", s.total_time_ms));
        line(&mut out, "setup time", format!("{} ms", s.setup_time_ms));
        if let Some(d) = self.downtime() {
            let span = match (self.extra.get("downtime-span"), self.vcpu_started_ns) {
                (Some(Value::String(span)), _) => format!(" ({span})"),
                (_, Some(_)) if self.vcpu_stopped_ns.is_some() => {
                    " (source vCPU stop to destination vCPU start)".to_string()
                }
                _ => String::new(),
            };
            line(&mut out, "downtime", format!("{d:.1} ms{span}"));
        }
        if let Some(d) = self.source_downtime_ms {
            line(
                &mut out,
                "source downtime",
                format!("{d:.1} ms (vCPU stop to last byte confirmed)"),
            );
        }
        line(
            &mut out,
            "transferred",
            format!(
                "{:.1} MiB of {:.1} MiB RAM ({} normal pages, {} zero pages, {} of them never \
                 populated)",
                r.transferred as f64 / MIB,
                r.total as f64 / MIB,
                r.normal,
                r.duplicate,
                r.unpopulated
            ),
        );
        line(&mut out, "throughput", format!("{:.0} mbps", r.mbps));
        line(
            &mut out,
            "dirty syncs",
            format!("{} ({} iterations)", r.dirty_sync_count, s.iterations),
        );
        line(
            &mut out,
            "dirty log",
            format!(
                "{} ({} clear calls)",
                self.dirty_log_mode, self.dirty_log_clears
            ),
        );
        let t = &s.throttle;
        if t.peak_percent > 0 {
            line(
                &mut out,
                "throttle",
                format!(
                    "{:.1} ms at up to {} % ({:.1} ms of each vCPU's time taken)",
                    t.throttled_ms, t.peak_percent, t.taken_ms
                ),
            );
        }
        if let Some(p) = self.postcopy_text() {
            line(&mut out, "postcopy", p);
        }
        if let Some(d) = self.digest {
            line(&mut out, "digest", format!("{d:#018x}"));
        }
        if let Some(g) = &self.guest {
            line(&mut out, "guest", g.to_string());
        }
        line(&mut out, "verified", self.verified.to_string());
        out
    }

    /// The postcopy line of the text summary: requests, fault latency and
    /// vCPU blocktime, from the fields the postcopy destination reported.
    fn postcopy_text(&self) -> Option<String> {
        if self.extra.get("postcopy") != Some(&Value::Bool(true)) {
            return None;
        }
        let mut text = format!("{} page requests", self.stats.ram.postcopy_requests);
        let latency = self.extra.get("postcopy-fault-latency");
        let us = |k: &str| latency.and_then(|l| l.get(k)).and_then(Value::as_f64);
        if let (Some(median), Some(p99)) = (us("median-us"), us("p99-us")) {
            text.push_str(&format!(
                ", fault latency median {median:.0} us, p99 {p99:.0} us"
            ));
        }
        if let Some(b) = self
            .extra
            .get("postcopy-vcpu-blocktime")
            .and_then(Value::as_array)
        {
            let each: Vec<String> = b
                .iter()
                .filter_map(Value::as_f64)
                .map(|ms| format!("{ms:.1} ms"))
                .collect();
            text.push_str(&format!(", vCPU blocktime {}", each.join(" ")));
        }
        Some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_core::stats::AmbiguousEnd;
    use livemig_core::status::MigrationStatus;

    #[test]
    fn json_uses_query_migrate_names() {
        let mut stats = MigrationStats {
            status: MigrationStatus::Completed,
            total_time_ms: 1500,
            ..MigrationStats::default()
        };
        stats.ram.normal_bytes = 4096;
        let sum = Summary {
            stats,
            downtime_ms: Some(12.5),
            verified: true,
            dirty_log_clears: 7,
            dirty_log_mode: "manual-protect".into(),
            backend: "kvm".into(),
            ..Summary::default()
        };
        let v = sum.to_json();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["total-time"], 1500);
        assert_eq!(v["downtime"], 12.5);
        assert_eq!(v["ram"]["normal-bytes"], 4096);
        assert_eq!(v["ram"]["postcopy-requests"], 0);
        assert_eq!(v["verified"], true);
        assert_eq!(v["dirty-log-clears"], 7);
        assert!(v.get("error-desc").is_none());
        let text = sum.to_text();
        assert!(
            text.contains("completed") && text.contains("12.5 ms"),
            "{text}"
        );
    }

    #[test]
    fn the_guest_object_is_reported_in_json_and_words() {
        let mut sum = Summary::default();
        assert!(sum.to_json().get("guest").is_none());
        assert!(!sum.to_text().contains("guest"));
        sum.guest = Some(GuestContinuity {
            vcpus: 2,
            vcpus_continued: 2,
            ticks_at_stop: 10,
            ticks_after: 20,
            serial_continued: true,
        });
        let v = sum.to_json();
        assert_eq!(v["guest"]["vcpus"], 2);
        assert_eq!(v["guest"]["vcpus-continued"], 2);
        assert_eq!(v["guest"]["ticks-after"], 20);
        assert_eq!(v["guest"]["serial-continued"], true);
        assert!(
            sum.to_text().contains(
                "guest                2 of 2 vCPUs continued, timer 10 -> 20 ticks, serial sequence continued"
            ),
            "{}",
            sum.to_text()
        );
    }

    #[test]
    fn postcopy_figures_have_a_text_line() {
        let mut sum = Summary::default();
        sum.stats.ram.postcopy_requests = 13;
        assert!(!sum.to_text().contains("postcopy"));
        sum.extra.insert("postcopy".into(), json!(true));
        sum.extra.insert(
            "postcopy-fault-latency".into(),
            json!({"median-us": 7474.0, "p99-us": 10290.1, "samples": 13}),
        );
        sum.extra
            .insert("postcopy-vcpu-blocktime".into(), json!([95.25]));
        let text = sum.to_text();
        assert!(
            text.contains(
                "13 page requests, fault latency median 7474 us, p99 10290 us, vCPU blocktime 95.2 ms"
            ),
            "{text}"
        );
    }

    #[test]
    fn failures_carry_their_reason() {
        let mut stats = MigrationStats {
            status: MigrationStatus::Failed,
            ..MigrationStats::default()
        };
        stats.error_desc.set(format_args!("connection lost: reset"));
        let sum = Summary {
            stats,
            ..Summary::default()
        };
        assert_eq!(sum.to_json()["error-desc"], "connection lost: reset");
        // A failed migration moved no guest: no downtime, not 0.
        let mut failed = sum.clone();
        failed.stats.downtime_ms = Some(0);
        failed.downtime_ms = Some(0.0);
        assert_eq!(failed.to_json()["downtime"], Value::Null);
        assert!(!failed.to_text().contains("downtime"));
        assert!(progress_line(&sum.stats).starts_with("failed"));
        let mut throttled = MigrationStats {
            expected_downtime_ms: 512,
            ..MigrationStats::default()
        };
        throttled.throttle.percent = 96;
        let line = progress_line(&throttled);
        assert!(line.ends_with("stop ~512 ms  throttle 96 %"), "{line}");
        assert!(sum.to_json().get("ambiguous-end").is_none());
    }

    #[test]
    fn an_ambiguous_end_carries_the_operator_sentence() {
        let mut stats = MigrationStats {
            status: MigrationStatus::Failed,
            ambiguous_end: Some(AmbiguousEnd::DestinationLoaded),
            ..MigrationStats::default()
        };
        stats
            .error_desc
            .set(format_args!("the source closed the connection"));
        let sum = Summary {
            stats,
            ..Summary::default()
        };
        let v = sum.to_json();
        assert_eq!(v["ambiguous-end"], "loaded");
        assert!(
            v["operator-action"]
                .as_str()
                .is_some_and(|a| a.contains("start it here, otherwise discard it"))
        );
        assert!(
            sum.to_text()
                .contains("ambiguous end        loaded: the end of the migration was cut")
        );
    }
}
