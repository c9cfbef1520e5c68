//! `livemig bench --verify-cost`: what the migration's self-check costs,
//! measured in one run.
//!
//! Each run of a case migrates the guest twice back to back, once verified
//! and once with verification off, the two in turn first (on-off, off-on,
//! ...) so that a drift in the machine's load weighs on both alike. The
//! table gives each figure's median both ways and the ratio of the medians,
//! verified over not: the cost of hashing every page sent on both ends, and
//! of the digest's exchange at the end.
//!
//! The runs without verification are checked too, by the digest of the
//! pages the destination guest did not write, taken after its watch
//! ([`MemoryCheck::Unwritten`](crate::demo::MemoryCheck::Unwritten)) and
//! by the guest's stamps, so neither stop holds a digest of all RAM.

use serde_json::{Map, Value, json};

use crate::bench::{
    self, BenchCase, BenchError, BenchOptions, CaseResult, Metric, RunResult, Spread,
};
use crate::interrupt::Cancel;
use livemig_core::config::MigrationConfig;
use livemig_kvm::migrate::SourceOptions;

/// The same case run verified and not, alternating.
#[derive(Debug, Clone)]
pub struct VerifyCost {
    /// The verified runs.
    pub on: CaseResult,
    /// The runs with verification off.
    pub off: CaseResult,
}

/// The figures compared (as bench's [`Metric`]s), downtime first: the bar is no downtime
/// increase within noise, and throughput (`migr GB/s`, and `vs raw TCP`,
/// which divides out the machine's speed at the time) at least 0.95 of
/// the unverified.
const FIGURES: [Metric; 7] = [
    ("downtime", "downtime ms", 2, RunResult::downtime_ms),
    ("source-downtime", "src down ms", 2, |r| {
        r.summary.source_downtime_ms
    }),
    ("final-pages", "final-pages ms", 3, |r| {
        r.breakdown()?.get("final-pages")?.as_f64()
    }),
    // The final pass's count varies from run to run with where the stop
    // falls; its time per page is what hashing it would lengthen.
    ("final-page-us", "us/final page", 2, |r| {
        let b = r.breakdown()?;
        let ms = b.get("final-pages")?.as_f64()?;
        let count = b.get("final-pages-count")?.as_f64()?;
        (count > 0.0).then(|| ms * 1e3 / count)
    }),
    ("total-time", "total ms", 0, |r| Some(r.total_ms())),
    ("migration-gbps", "migr GB/s", 2, RunResult::migration_gbps),
    ("ratio", "vs raw TCP", 2, RunResult::ratio),
];

/// Runs `case` `opts.runs` times each way, alternating which goes first
/// (`opts.source.verify` is ignored; an audit, if asked for, runs in the
/// verified runs only).
pub fn run_case(
    case: BenchCase,
    opts: &BenchOptions,
    config: &MigrationConfig,
    data: &[u8],
    cancel: &Cancel,
) -> Result<VerifyCost, BenchError> {
    if opts.runs == 0 {
        return Err(BenchError::NoRuns);
    }
    let with = |verify: bool| BenchOptions {
        source: SourceOptions {
            verify,
            audit: verify && opts.source.audit,
            ..opts.source.clone()
        },
        ..opts.clone()
    };
    let (on_opts, off_opts) = (with(true), with(false));
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 1..=opts.runs {
        let order = if i % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for verify in order {
            if verify {
                on.push(bench::run_one(case, i, &on_opts, config, data, cancel)?);
            } else {
                off.push(bench::run_one(case, i, &off_opts, config, data, cancel)?);
            }
        }
    }
    Ok(VerifyCost {
        on: CaseResult { case, runs: on },
        off: CaseResult { case, runs: off },
    })
}

impl VerifyCost {
    /// Every run, both ways, completed and matched the source.
    pub fn verified(&self) -> bool {
        self.on.verified() && self.off.verified()
    }

    /// The median of `figure` verified over its median not; `None` where
    /// either is missing or the unverified one is 0.
    fn ratio(&self, figure: fn(&RunResult) -> Option<f64>) -> Option<f64> {
        let on = self.on.spread(figure)?.median;
        let off = self.off.spread(figure)?.median;
        (off != 0.0).then(|| on / off)
    }

    /// The comparison as one JSON object: each figure's spread both ways
    /// and the ratio of the medians, then both sets of runs in full.
    pub fn to_json(&self) -> Value {
        let mut figures = Map::new();
        for (name, _, _, figure) in FIGURES {
            let spread = |c: &CaseResult| c.spread(figure).map_or(Value::Null, Spread::to_json);
            figures.insert(
                name.into(),
                json!({
                    "verify-on": spread(&self.on),
                    "verify-off": spread(&self.off),
                    "on-over-off": self.ratio(figure),
                }),
            );
        }
        json!({
            "case": self.on.case.name,
            "runs": self.on.runs.len(),
            "verify-cost": Value::Object(figures),
            "verified": self.verified(),
            "verify-on": self.on.to_json(),
            "verify-off": self.off.to_json(),
        })
    }

    /// The comparison as a text table: one row per figure with its median
    /// both ways, the ratio, and each way's min..max, then what the
    /// columns mean.
    pub fn table(&self) -> String {
        let mut rows = vec![
            [
                "figure",
                "verify on",
                "verify off",
                "on/off",
                "on min..max",
                "off min..max",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for (_, title, digits, figure) in FIGURES {
            let (on, off) = (self.on.spread(figure), self.off.spread(figure));
            let median =
                |s: Option<Spread>| s.map_or("-".into(), |s| format!("{:.digits$}", s.median));
            let range = |s: Option<Spread>| {
                s.map_or("-".into(), |s| {
                    format!("{:.digits$}..{:.digits$}", s.min, s.max)
                })
            };
            rows.push(vec![
                title.to_string(),
                median(on),
                median(off),
                self.ratio(figure).map_or("-".into(), |r| format!("{r:.3}")),
                range(on),
                range(off),
            ]);
        }
        let mut out = format!(
            "{}: verification on against off, {} runs each, alternating which goes first \
             (medians)\n",
            self.on.case.name,
            self.on.runs.len()
        );
        out.push_str(&bench::columns(&rows));
        out.push_str(
            "on/off is the verified median over the unverified one: downtime within the two \
             min..max spreads is no increase within noise; throughput (migr GB/s, and vs raw TCP, \
             the migration over a raw TCP copy of the same bytes in the same run) should stay \
             at 0.95 or above. Runs without verification are checked by the digest of the \
             pages the destination guest did not write, taken after its watch, outside the \
             stop.\n",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::RawCopy;
    use crate::report::Summary;
    use livemig_core::stats::MigrationStats;
    use livemig_core::status::MigrationStatus;

    fn run(downtime_ms: f64, total_ms: u64) -> RunResult {
        let mut stats = MigrationStats {
            status: MigrationStatus::Completed,
            total_time_ms: total_ms,
            ..MigrationStats::default()
        };
        stats.ram.transferred = 100_000_000;
        RunResult {
            summary: Summary {
                stats,
                downtime_ms: Some(downtime_ms),
                verified: true,
                ..Summary::default()
            },
            raw_same_bytes: RawCopy {
                bytes: 100_000_000,
                ns: 50_000_000,
            },
            raw_all_ram: RawCopy {
                bytes: 1 << 30,
                ns: 500_000_000,
            },
        }
    }

    #[test]
    fn ratios_are_of_the_medians_each_way() {
        let case = bench::CASES[0];
        let cost = VerifyCost {
            on: CaseResult {
                case,
                runs: vec![run(4.0, 400), run(6.0, 410), run(100.0, 420)],
            },
            off: CaseResult {
                case,
                runs: vec![run(5.0, 390), run(3.0, 400), run(4.0, 500)],
            },
        };
        assert!(cost.verified());
        assert_eq!(cost.ratio(RunResult::downtime_ms), Some(1.5));
        assert_eq!(cost.ratio(|r| Some(r.total_ms())), Some(410.0 / 400.0));
        let j = cost.to_json();
        assert_eq!(j["verify-cost"]["downtime"]["on-over-off"], json!(1.5));
        assert_eq!(
            j["verify-cost"]["downtime"]["verify-off"]["max"],
            json!(5.0)
        );
        assert_eq!(
            j["verify-cost"]["final-pages"]["on-over-off"],
            Value::Null,
            "no breakdown, no figure"
        );
        let text = cost.table();
        assert!(text.contains("1.500"), "{text}");
        assert!(text.contains("4.00..100.00"), "{text}");
        assert!(text.contains("3 runs each"), "{text}");
    }

    #[test]
    fn one_unverified_run_either_way_fails_the_comparison() {
        let case = bench::CASES[0];
        let mut bad = run(1.0, 100);
        bad.summary.verified = false;
        let cost = VerifyCost {
            on: CaseResult {
                case,
                runs: vec![run(1.0, 100)],
            },
            off: CaseResult {
                case,
                runs: vec![bad],
            },
        };
        assert!(!cost.verified());
    }
}
