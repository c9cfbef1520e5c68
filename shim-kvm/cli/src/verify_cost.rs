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
//! Between the pairs it also times the source's own work per page sent,
//! outside a migration ([`SourceReads`]): the scan's read of each page and
//! the copy out of it, unverified, with the term hashed in the scan's read
//! (what the source does) and with it hashed after the copy (what it did
//! before), the three in turn. The migrations' figures move with the
//! machine's load; these isolate the hash's cost on the source's thread.
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
use livemig_core::digest::DigestKey;
use livemig_kvm::memory::{GuestMemory, MemoryError, PAGE_SIZE, RegionLayout};
use livemig_kvm::migrate::SourceOptions;
use std::time::Instant;

/// The same case run verified and not, alternating.
#[derive(Debug, Clone)]
pub struct VerifyCost {
    /// The verified runs.
    pub on: CaseResult,
    /// The runs with verification off.
    pub off: CaseResult,
    /// The source's work per page, one measurement after each pair.
    pub reads: Vec<SourceReads>,
}

/// The source's work per page sent, us a page, over [`READS_MIB`] MiB of
/// non-zero pages in batches of [`READS_BATCH`] (a pass of busy-1g's
/// working set, larger than a core's cache, as the engine's batches are),
/// each way over the whole memory once, the three in turn. The kernel's
/// copy of a batch into the socket is stood in for by a copy of it into a
/// buffer of the batch's size ([`GuestMemory::read`], a `memcpy` like the
/// kernel's `copy_from_user`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceReads {
    /// Unverified: the zero check of each page, then the batch's copy.
    pub plain_us: f64,
    /// Verified as the source does it: each page's term in the scan's read
    /// (its zero check), then the copy.
    pub fused_us: f64,
    /// Verified as the source did before: the zero check, the copy, then
    /// each page's term read from memory again.
    pub after_us: f64,
}

/// Guest memory [`SourceReads`] goes over: busy-1g's working set.
pub const READS_MIB: usize = 64;
/// Pages of one batch, as the engine's.
pub const READS_BATCH: usize = livemig_core::source::BATCH_PAGES;

/// The memory [`SourceReads`] measures over, made and filled once.
struct ReadsMemory {
    ram: GuestMemory,
    buf: Vec<u8>,
    key: DigestKey,
}

impl ReadsMemory {
    fn new() -> Result<Self, MemoryError> {
        let bytes = (READS_MIB << 20) as u64;
        let ram = GuestMemory::anonymous(&RegionLayout::contiguous("reads", bytes, bytes)?)?;
        let fill: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 1) as u8).collect();
        for at in (0..bytes).step_by(fill.len()) {
            ram.write(at, &fill)?;
        }
        Ok(Self {
            ram,
            buf: vec![0; READS_BATCH * PAGE_SIZE],
            key: DigestKey::new(0x5EED),
        })
    }

    /// One pass over the memory `hash`ing as it says, us a page; the sum
    /// of the terms goes into `sink` so that no hashing is optimised away.
    fn pass(&mut self, hash: Hash, sink: &mut u64) -> Result<f64, MemoryError> {
        let pages = (READS_MIB << 20) / PAGE_SIZE;
        let start = Instant::now();
        for first in (0..pages).step_by(READS_BATCH) {
            let batch = first as u64..(first + READS_BATCH).min(pages) as u64;
            for page in batch.clone() {
                let zero = match hash {
                    Hash::InRead => {
                        let term = self.ram.page_term(0, page, &self.key)?;
                        *sink = sink.wrapping_add(term);
                        term == 0
                    }
                    Hash::None | Hash::After => self.ram.is_zero_page(0, page)?,
                };
                *sink = sink.wrapping_add(u64::from(zero));
            }
            let len = (batch.end - batch.start) as usize * PAGE_SIZE;
            self.ram
                .read(batch.start * PAGE_SIZE as u64, &mut self.buf[..len])?;
            if hash == Hash::After {
                for page in batch {
                    *sink = sink.wrapping_add(self.ram.page_term(0, page, &self.key)?);
                }
            }
        }
        Ok(start.elapsed().as_nanos() as f64 / 1e3 / pages as f64)
    }

    /// The three ways once each, in turn.
    fn measure(&mut self) -> Result<SourceReads, MemoryError> {
        let mut sink = 0u64;
        let plain_us = self.pass(Hash::None, &mut sink)?;
        let fused_us = self.pass(Hash::InRead, &mut sink)?;
        let after_us = self.pass(Hash::After, &mut sink)?;
        std::hint::black_box(sink);
        Ok(SourceReads {
            plain_us,
            fused_us,
            after_us,
        })
    }
}

/// Where a [`ReadsMemory::pass`] hashes each page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hash {
    None,
    InRead,
    After,
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
    let mut memory = ReadsMemory::new().map_err(BenchError::Memory)?;
    let mut reads = Vec::new();
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
        reads.push(memory.measure().map_err(BenchError::Memory)?);
    }
    Ok(VerifyCost {
        on: CaseResult { case, runs: on },
        off: CaseResult { case, runs: off },
        reads,
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

    /// The spread of `figure`'s ratio verified over not within each round
    /// (run `i` each way: the two ran back to back, so a drift of the
    /// host's load between rounds cancels out); `None` where no round has
    /// both, rounds whose unverified figure is missing or 0 left out.
    fn paired(&self, figure: fn(&RunResult) -> Option<f64>) -> Option<Spread> {
        Spread::of(
            self.on
                .runs
                .iter()
                .zip(&self.off.runs)
                .filter_map(|(on, off)| Some((figure(on)?, figure(off)?)))
                .filter(|&(_, off)| off != 0.0)
                .map(|(on, off)| on / off),
        )
    }

    /// The comparison as one JSON object: each figure's spread both ways,
    /// the ratio of the medians and the spread of the rounds' ratios, then
    /// both sets of runs in full.
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
                    "rounds-on-over-off": self
                        .paired(figure)
                        .map_or(Value::Null, Spread::to_json),
                }),
            );
        }
        let reads = |f: fn(&SourceReads) -> f64| {
            Spread::of(self.reads.iter().map(f)).map_or(Value::Null, Spread::to_json)
        };
        json!({
            "case": self.on.case.name,
            "runs": self.on.runs.len(),
            "verify-cost": Value::Object(figures),
            "source-us-per-page": {
                "mib": READS_MIB,
                "unverified": reads(|r| r.plain_us),
                "hash-in-read": reads(|r| r.fused_us),
                "hash-after-copy": reads(|r| r.after_us),
            },
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
                "rounds on/off",
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
                self.paired(figure).map_or("-".into(), |p| {
                    format!("{:.3} ({:.3}..{:.3})", p.median, p.min, p.max)
                }),
            ]);
        }
        let mut out = format!(
            "{}: verification on against off, {} runs each, alternating which goes first \
             (medians)\n",
            self.on.case.name,
            self.on.runs.len()
        );
        out.push_str(&bench::columns(&rows));
        out.push_str(&self.reads_line());
        out.push_str(
            "on/off is the verified median over the unverified one, rounds on/off the median \
             (min..max) of each round's verified run over its unverified one, run back to \
             back: downtime within the two min..max spreads is no increase within noise; \
             throughput (migr GB/s, and vs raw TCP, \
             the migration over a raw TCP copy of the same bytes in the same run) should stay \
             at 0.95 or above. Runs without verification are checked by the digest of the \
             pages the destination guest did not write, taken after its watch, outside the \
             stop.\n",
        );
        out
    }

    /// The [`SourceReads`] medians as a line of the table: each way's us a
    /// page and, for the verified ways, the unverified over it (the source
    /// thread's throughput, verified, as a fraction of unverified).
    fn reads_line(&self) -> String {
        let median = |f: fn(&SourceReads) -> f64| Spread::of(self.reads.iter().map(f));
        let (Some(plain), Some(fused), Some(after)) = (
            median(|r| r.plain_us),
            median(|r| r.fused_us),
            median(|r| r.after_us),
        ) else {
            return String::new();
        };
        let way = |s: Spread| {
            format!(
                "{:.3} ({:.3}..{:.3}, {:.2}x)",
                s.median,
                s.min,
                s.max,
                plain.median / s.median
            )
        };
        format!(
            "source's work per page, outside a migration ({READS_MIB} MiB of non-zero pages in \
             batches of {READS_BATCH}, a memcpy for the socket's copy; {} rounds, median \
             (min..max, unverified over it)): unverified {:.3} us, hashed in the scan's read \
             (now) {}, hashed after the copy (before) {}\n",
            self.reads.len(),
            plain.median,
            way(fused),
            way(after),
        )
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

    fn j_rounds(j: &Value) -> Value {
        j["verify-cost"]["downtime"]["rounds-on-over-off"].clone()
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
            reads: vec![
                SourceReads {
                    plain_us: 0.4,
                    fused_us: 0.5,
                    after_us: 0.8,
                },
                SourceReads {
                    plain_us: 0.6,
                    fused_us: 0.6,
                    after_us: 1.2,
                },
            ],
        };
        assert!(cost.verified());
        assert_eq!(cost.ratio(RunResult::downtime_ms), Some(1.5));
        assert_eq!(cost.ratio(|r| Some(r.total_ms())), Some(410.0 / 400.0));
        // Rounds: 4/5, 6/3, 100/4.
        let rounds = cost.paired(RunResult::downtime_ms).unwrap();
        assert_eq!((rounds.median, rounds.min, rounds.max), (2.0, 0.8, 25.0));
        assert_eq!(
            j_rounds(&cost.to_json()),
            json!({"median": 2.0, "min": 0.8, "max": 25.0})
        );
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
        assert!(text.contains("2.000 (0.800..25.000)"), "{text}");
        assert!(text.contains("4.00..100.00"), "{text}");
        assert!(text.contains("3 runs each"), "{text}");
        assert!(
            text.contains("unverified 0.500 us, hashed in the scan's read (now) 0.550 (0.500..0.600, 0.91x), hashed after the copy (before) 1.000 (0.800..1.200, 0.50x)"),
            "{text}"
        );
        assert_eq!(
            j["source-us-per-page"]["hash-after-copy"]["median"],
            json!(1.0)
        );
    }

    /// The measurement runs over real memory: the three ways each take
    /// some time, and hashing after the copy reads every page once more
    /// than the unverified way.
    #[test]
    fn the_source_reads_are_measured_over_real_pages() {
        let mut m = ReadsMemory::new().unwrap();
        let r = m.measure().unwrap();
        assert!(
            r.plain_us > 0.0 && r.fused_us > 0.0 && r.after_us > 0.0,
            "{r:?}"
        );
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
            reads: Vec::new(),
        };
        assert!(!cost.verified());
    }
}
