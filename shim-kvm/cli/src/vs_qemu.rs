//! `livemig bench --vs-qemu`: each case's livemig runs alternating with
//! QEMU migrating the same guest ([`qemu`]), and the ratios
//! livemig / QEMU of the medians.
//!
//! Same guest image and parameters, RAM, working set, vCPUs, warmup,
//! downtime limit and bandwidth, both over TCP on 127.0.0.1, one livemig
//! run then one QEMU run, so both see the same machine load. QEMU's
//! `downtime` is taken on the source, from its vCPU stop to the end of the
//! migration: livemig's `source-downtime` (stop to the destination's
//! confirmation of the last byte) is the figure it compares with; livemig's
//! `downtime` (source stop to destination vCPU start, across the two
//! processes) is printed beside it.

use std::path::Path;

use livemig_core::config::MigrationConfig;
use serde_json::{Value, json};

use crate::bench::{self, BenchCase, BenchError, BenchOptions, CaseResult, RunResult, Spread};
use crate::interrupt::Cancel;
use crate::qemu::{self, QemuRun, QemuSettings};

const MIB: f64 = (1u64 << 20) as f64;

/// One case run both ways.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// livemig's runs, as `livemig bench` reports them.
    pub livemig: CaseResult,
    /// QEMU's runs, in order (each alternated with livemig's of the same
    /// index).
    pub qemu: Vec<QemuRun>,
}

/// A QEMU metric: JSON name, column title, digits, how to read it.
type QemuMetric = (&'static str, &'static str, usize, fn(&QemuRun) -> f64);

const QEMU_METRICS: [QemuMetric; 4] = [
    ("total-time", "total ms", 0, |r| r.total_ms),
    ("downtime", "downtime ms", 1, |r| r.downtime_ms),
    ("setup-time", "setup ms", 0, |r| r.setup_ms),
    ("transferred-mib", "sent MiB", 1, |r| {
        r.transferred as f64 / MIB
    }),
];

/// A ratio livemig / QEMU of medians: JSON name, column title, livemig's
/// figure, QEMU's.
type Ratio = (
    &'static str,
    &'static str,
    fn(&RunResult) -> Option<f64>,
    fn(&QemuRun) -> f64,
);

const RATIOS: [Ratio; 4] = [
    (
        "total-time",
        "total x",
        |r| Some(r.total_ms()),
        |q| q.total_ms,
    ),
    (
        "source-downtime",
        "src downtime x",
        |r| r.summary.source_downtime_ms,
        |q| q.downtime_ms,
    ),
    ("downtime", "downtime x", RunResult::downtime_ms, |q| {
        q.downtime_ms
    }),
    (
        "transferred",
        "sent x",
        |r| Some(r.transferred() as f64),
        |q| q.transferred as f64,
    ),
];

impl Comparison {
    fn qemu_spread(&self, metric: fn(&QemuRun) -> f64) -> Option<Spread> {
        Spread::of(self.qemu.iter().map(metric))
    }

    /// livemig's median over QEMU's; `None` without runs or with a QEMU
    /// median of 0 (a ratio that would not be finite).
    pub fn ratio(
        &self,
        livemig: fn(&RunResult) -> Option<f64>,
        qemu: fn(&QemuRun) -> f64,
    ) -> Option<f64> {
        let l = self.livemig.spread(livemig)?.median;
        let q = self.qemu_spread(qemu)?.median;
        (q > 0.0).then(|| l / q)
    }

    /// The QEMU runs and the ratios, to add to the case's JSON object.
    pub fn qemu_json(&self) -> (Value, Value) {
        let mut q = serde_json::Map::new();
        q.insert("runs".into(), json!(self.qemu.len()));
        for (name, _, _, metric) in QEMU_METRICS {
            let v = self
                .qemu_spread(metric)
                .map_or(Value::Null, Spread::to_json);
            q.insert(name.into(), v);
        }
        q.insert(
            "run-results".into(),
            Value::Array(self.qemu.iter().map(QemuRun::to_json).collect()),
        );
        let mut r = serde_json::Map::new();
        for (name, _, l, qm) in RATIOS {
            r.insert(name.into(), json!(self.ratio(l, qm)));
        }
        (Value::Object(q), Value::Object(r))
    }

    /// The case's JSON object (as `bench --json` prints it) with `qemu` and
    /// `livemig-over-qemu` added.
    pub fn to_json(&self, qemu_version: &str) -> Value {
        let mut v = self.livemig.to_json();
        let (q, r) = self.qemu_json();
        if let Value::Object(o) = &mut v {
            o.insert("qemu-version".into(), json!(qemu_version));
            o.insert("qemu".into(), q);
            o.insert("livemig-over-qemu".into(), r);
        }
        v
    }
}

/// Runs `case` `opts.runs` times each way, alternating: livemig run `i`,
/// then QEMU run `i`.
pub fn run_case(
    case: BenchCase,
    opts: &BenchOptions,
    config: &MigrationConfig,
    data: &[u8],
    qemu_binary: &Path,
    cancel: &Cancel,
) -> Result<Comparison, BenchError> {
    if opts.runs == 0 {
        return Err(BenchError::NoRuns);
    }
    let settings = QemuSettings {
        downtime_limit_ms: config.parameters.downtime_limit_ms,
        max_bandwidth: config.parameters.max_bandwidth,
        warmup: opts.warmup,
        run_for: opts.run_for,
    };
    let mut runs = Vec::new();
    let mut qemu_runs = Vec::new();
    for i in 1..=opts.runs {
        runs.push(bench::run_one(case, i, opts, config, data, cancel)?);
        // Under this host's PVM a migrated QEMU guest now and then does
        // not go on at all (every vCPU's stamp counter stays where it
        // stood, seen about once in 15 runs); such a run says nothing of
        // QEMU's migration speed. It is retried once, and said so; a
        // second one is an error.
        let shape = bench::shape(case, opts);
        let q = match qemu::run_once(qemu_binary, shape, settings, cancel) {
            Err(e @ qemu::QemuError::NotContinued { .. }) => {
                eprintln!("bench: {} QEMU run {i}: {e}; retried once", case.name);
                qemu::run_once(qemu_binary, shape, settings, cancel)
            }
            other => other,
        }
        .map_err(BenchError::Qemu)?;
        if opts.verbose {
            eprintln!(
                "bench: {} QEMU run {i}/{}: total {} ms, downtime {} ms, sent {:.1} MiB, {}, destination {}",
                case.name,
                opts.runs,
                q.total_ms,
                q.downtime_ms,
                q.transferred as f64 / MIB,
                q.status,
                q.destination_status
            );
        }
        qemu_runs.push(q);
    }
    Ok(Comparison {
        livemig: CaseResult { case, runs },
        qemu: qemu_runs,
    })
}

/// The QEMU table (medians, then min..max) and the ratios livemig / QEMU.
pub fn table(results: &[Comparison], qemu_version: &str) -> String {
    let mut head = vec!["case".to_string(), "runs".to_string()];
    head.extend(QEMU_METRICS.iter().map(|m| m.1.to_string()));
    head.push("completed".into());
    let mut rows = vec![head];
    for c in results {
        let mut row = vec![c.livemig.case.name.to_string(), c.qemu.len().to_string()];
        for (_, _, digits, metric) in QEMU_METRICS {
            row.push(
                c.qemu_spread(metric)
                    .map_or("-".into(), |s| format!("{:.*}", digits, s.median)),
            );
        }
        let done = c.qemu.iter().filter(|r| r.status == "completed").count();
        row.push(format!("{done}/{}", c.qemu.len()));
        rows.push(row);
    }
    for c in results {
        let mut row = vec![c.livemig.case.name.to_string(), "min..max".to_string()];
        for (_, _, digits, metric) in QEMU_METRICS {
            row.push(c.qemu_spread(metric).map_or("-".into(), |s| {
                format!("{:.*}..{:.*}", digits, s.min, digits, s.max)
            }));
        }
        row.push(String::new());
        rows.push(row);
    }
    let mut out = format!("\nQEMU ({qemu_version}), same guest, alternating with the runs above\n");
    out.push_str(&bench::columns(&rows));

    let mut head = vec!["case".to_string()];
    head.extend(RATIOS.iter().map(|r| r.1.to_string()));
    head.push("livemig src downtime ms".into());
    head.push("livemig downtime ms".into());
    head.push("QEMU best downtime ms".into());
    let mut rows = vec![head];
    for c in results {
        let mut row = vec![c.livemig.case.name.to_string()];
        for (_, _, l, q) in RATIOS {
            row.push(c.ratio(l, q).map_or("-".into(), |r| format!("{r:.2}")));
        }
        let median = |s: Option<Spread>| s.map_or("-".into(), |s| format!("{:.1}", s.median));
        row.push(median(c.livemig.spread(|r| r.summary.source_downtime_ms)));
        row.push(median(c.livemig.spread(RunResult::downtime_ms)));
        row.push(
            c.qemu_spread(|q| q.downtime_ms)
                .map_or("-".into(), |s| format!("{:.1}", s.min)),
        );
        rows.push(row);
    }
    out.push_str("\nlivemig / QEMU (ratio of medians; below 1 = livemig smaller)\n");
    out.push_str(&bench::columns(&rows));
    out.push_str(LEGEND);
    out
}

const LEGEND: &str = "
QEMU total/downtime/setup/sent: query-migrate's total-time, downtime, setup-time, ram.transferred
completed       runs whose query-migrate said completed and whose destination ran the guest on
                (query-status running, every vCPU's stamp counter past the source's)
total x         livemig total-time / QEMU total-time
src downtime x  livemig source-downtime (source vCPU stop to the destination's confirmation)
                / QEMU downtime (source vCPU stop to the end of the migration): the same span
downtime x      livemig downtime (source stop to destination vCPU start) / QEMU downtime
sent x          livemig bytes sent / QEMU ram.transferred
QEMU's side is not digest-checked (only livemig's runs compare memory digests).
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::RawCopy;
    use crate::report::Summary;
    use livemig_core::stats::MigrationStats;
    use livemig_core::status::MigrationStatus;

    fn livemig_run(total_ms: u64, src_downtime: f64) -> RunResult {
        let mut stats = MigrationStats {
            status: MigrationStatus::Completed,
            total_time_ms: total_ms,
            ..MigrationStats::default()
        };
        stats.ram.transferred = 100 << 20;
        stats.ram.total = 1 << 30;
        let copy = RawCopy { bytes: 1, ns: 1 };
        RunResult {
            summary: Summary {
                stats,
                downtime_ms: Some(src_downtime + 1.0),
                source_downtime_ms: Some(src_downtime),
                verified: true,
                ..Summary::default()
            },
            raw_same_bytes: copy,
            raw_all_ram: copy,
        }
    }

    fn qemu_run(total_ms: f64, downtime_ms: f64) -> QemuRun {
        QemuRun {
            status: "completed".into(),
            total_ms,
            downtime_ms,
            setup_ms: 2.0,
            transferred: 200 << 20,
            ram_total: 1 << 30,
            destination_status: "running".into(),
            stamped_after: 10,
        }
    }

    fn comparison() -> Comparison {
        Comparison {
            livemig: CaseResult {
                case: bench::CASES[1],
                runs: vec![livemig_run(100, 2.0), livemig_run(120, 4.0)],
            },
            qemu: vec![qemu_run(300.0, 20.0), qemu_run(500.0, 10.0)],
        }
    }

    #[test]
    fn ratios_are_of_medians() {
        let c = comparison();
        let (_, r) = c.qemu_json();
        assert_eq!(r["total-time"], 110.0 / 400.0);
        assert_eq!(r["source-downtime"], 3.0 / 15.0);
        assert_eq!(r["downtime"], 4.0 / 15.0);
        assert_eq!(r["transferred"], 0.5);
        let mut zero = c.clone();
        zero.qemu = vec![qemu_run(0.0, 0.0)];
        assert_eq!(zero.qemu_json().1["downtime"], Value::Null);
    }

    #[test]
    fn table_and_json_show_qemu_and_the_ratios() {
        let c = comparison();
        let text = table(std::slice::from_ref(&c), "QEMU 10");
        assert!(text.contains("QEMU (QEMU 10)"), "{text}");
        assert!(text.contains("300..500"), "{text}");
        assert!(text.contains("2/2"), "{text}");
        assert!(text.contains("0.28"), "{text}");
        assert!(text.contains("10.0"), "QEMU's best downtime: {text}");
        let v = c.to_json("QEMU 10");
        assert_eq!(v["case"], "busy-1g");
        assert_eq!(v["qemu"]["total-time"]["median"], 400.0);
        assert_eq!(v["qemu"]["run-results"][1]["destination-status"], "running");
        assert_eq!(v["livemig-over-qemu"]["transferred"], 0.5);
        assert_eq!(v["qemu-version"], "QEMU 10");
    }
}
