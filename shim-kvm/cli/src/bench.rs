//! `livemig bench`: how fast a real migration is, against a baseline
//! measured in the same run.
//!
//! A throughput figure on its own says little: the same code is twice as
//! fast on a quiet machine as on a busy one. So each run of a case does
//! three things back to back on the same machine:
//!
//! 1. the real migration, exactly as `livemig demo` does it (a destination
//!    child process, TCP over 127.0.0.1, the guest verified on the far side);
//! 2. a raw TCP copy of the *same number of bytes* the migration sent, from
//!    this process to a `livemig bench-sink` child, over the same kind of
//!    socket (the transport's [`Connection`] and [`Listener`], so the same
//!    `TCP_NODELAY` and buffer sizes): the ratio of the two is how close the
//!    migration comes to what the wire alone allows;
//! 3. a raw TCP copy of the guest's *whole RAM*: what moving the guest would
//!    cost without zero-page detection and dirty tracking, the migration's
//!    win over the naive approach.
//!
//! The copies cross a process boundary, as the migration does. Each case
//! runs several times and is reported as median, minimum and maximum; a
//! migration that does not verify fails the bench.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use livemig_core::config::MigrationConfig;
use livemig_core::status::MigrationStatus;
use serde_json::{Map, Value, json};

use crate::breakdown::DESTINATION_PARTS;
use crate::demo::{self, DemoError, GuestShape, MemoryCheck};
use crate::interrupt::Cancel;
use crate::qemu::QemuError;
use crate::report::{Progress, Summary};
use livemig_kvm::clock;
use livemig_kvm::dirty_log::DirtyLogMode;
use livemig_kvm::migrate::SourceOptions;
use livemig_kvm::migrate::source::StopPart;
use livemig_kvm::transport::{Connection, Listener, MigrationUri, TransportError};

const MIB: u64 = 1 << 20;

/// Bytes per `write` of the raw copy: large, like a full page batch, so the
/// baseline is not slowed by system-call overhead.
pub const COPY_WRITE_BYTES: usize = 4 << 20;

/// Size of the source buffer the raw copy sends from, cycled for longer
/// copies: larger than any cache, so the sender reads memory as the
/// migration reads guest RAM.
pub const COPY_BUFFER_BYTES: usize = 64 << 20;

/// Read buffer of the sink: the size the migration destination reads with.
const SINK_READ_BYTES: usize = 1 << 20;

/// The byte the sink sends back once it has read everything; the copy's
/// clock stops when it arrives.
const ACK: u8 = 0xac;

/// One benchmark case: a guest shape to migrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchCase {
    /// The name `--case` selects it by.
    pub name: &'static str,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Working set the guest keeps rewriting, in MiB (0 = idle).
    pub dirty_mib: u64,
}

/// The standard cases: an idle guest, where zero-page detection is the
/// whole story, and a busy guest, where the dirty working set has to
/// converge while the guest keeps writing.
pub const CASES: [BenchCase; 2] = [
    BenchCase {
        name: "idle-4g",
        mem_mib: 4096,
        dirty_mib: 0,
    },
    BenchCase {
        name: "busy-1g",
        mem_mib: 1024,
        dirty_mib: 64,
    },
];

impl BenchCase {
    /// The standard case called `name`.
    pub fn by_name(name: &str) -> Option<BenchCase> {
        CASES.into_iter().find(|c| c.name == name)
    }

    /// The same case with `mem_mib` of RAM and the working set scaled in
    /// proportion (at least 1 MiB if the case has one), so a small run keeps
    /// the shape of the full one. For quick checks, not for the numbers.
    pub fn scaled(self, mem_mib: u64) -> BenchCase {
        let dirty_mib = match self.dirty_mib {
            0 => 0,
            d => (d.saturating_mul(mem_mib) / self.mem_mib.max(1)).max(1),
        };
        BenchCase {
            mem_mib,
            dirty_mib,
            ..self
        }
    }
}

/// How the bench runs each case.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Runs per case (at least 1).
    pub runs: u32,
    /// How long the guest runs before each migration.
    pub warmup: Duration,
    /// How long the guest runs on the destination before the verdict.
    pub run_for: Duration,
    /// Per-run progress lines on stderr.
    pub verbose: bool,
    /// vCPUs of every guest.
    pub vcpus: u32,
    /// The source driver's options (whether the migration verifies itself,
    /// and audits at the stop).
    pub source: SourceOptions,
}

/// Why the bench could not produce its numbers.
#[derive(Debug)]
pub enum BenchError {
    /// `/dev/kvm` is not usable: the simulated backend has no real time to
    /// measure, so the bench refuses to run there.
    NoKvm,
    /// `--runs 0`.
    NoRuns,
    /// The migration could not be set up (boot, child, connection).
    Demo(DemoError),
    /// The migration was cancelled (Ctrl-C).
    Cancelled,
    /// A raw copy's socket failed.
    Transport(TransportError),
    /// The sink process misbehaved; says how.
    Sink(String),
    /// The sender of a raw copy stopped early or sent something else.
    Protocol(String),
    /// The QEMU side of `--vs-qemu` failed.
    Qemu(QemuError),
    /// Memory for a measurement outside a migration could not be made or
    /// read.
    Memory(livemig_kvm::memory::MemoryError),
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::NoKvm => write!(
                f,
                "bench needs /dev/kvm: the simulated backend has no real time to measure"
            ),
            BenchError::NoRuns => write!(f, "bench: --runs must be at least 1"),
            BenchError::Demo(e) => write!(f, "bench migration: {e}"),
            BenchError::Cancelled => write!(f, "bench cancelled"),
            BenchError::Transport(e) => write!(f, "raw TCP copy: {e}"),
            BenchError::Sink(e) => write!(f, "raw TCP copy: the sink process {e}"),
            BenchError::Protocol(e) => write!(f, "raw TCP copy: {e}"),
            BenchError::Qemu(e) => write!(f, "bench --vs-qemu: {e}"),
            BenchError::Memory(e) => write!(f, "bench: memory: {e}"),
        }
    }
}

impl std::error::Error for BenchError {}

impl From<TransportError> for BenchError {
    fn from(e: TransportError) -> Self {
        BenchError::Transport(e)
    }
}

impl From<DemoError> for BenchError {
    fn from(e: DemoError) -> Self {
        BenchError::Demo(e)
    }
}

/// One timed raw TCP copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawCopy {
    /// Bytes copied (the length header and the acknowledgement excluded).
    pub bytes: u64,
    /// Nanoseconds from before the connect to the acknowledgement.
    pub ns: u64,
}

impl RawCopy {
    /// Throughput in GB/s (10^9 bytes per second).
    pub fn gbps(&self) -> f64 {
        gbps(self.bytes, self.ns as f64 / 1e9)
    }

    /// Seconds taken.
    pub fn seconds(&self) -> f64 {
        self.ns as f64 / 1e9
    }
}

/// 10^9 bytes per second, 0 for an empty interval.
fn gbps(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / 1e9
    } else {
        0.0
    }
}

/// Pseudo-random bytes without zero pages: like the pages a migration
/// sends (never all zero, incompressible), deterministic so runs compare.
pub fn guest_like_data(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        // xorshift64: never reaches 0 from a non-zero seed.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// Sends `bytes` bytes to the sink at `uri`, cycling through `data`, and
/// times it from before the connect until the sink's acknowledgement that
/// it read them all.
pub fn copy_to(uri: &MigrationUri, bytes: u64, data: &[u8]) -> Result<RawCopy, BenchError> {
    if data.is_empty() && bytes > 0 {
        return Err(BenchError::Protocol("no data to send".into()));
    }
    let start = clock::monotonic_ns();
    let conn = Connection::connect(uri)?;
    conn.write_all(&bytes.to_be_bytes())?;
    let mut left = bytes;
    let mut at = 0usize;
    while left > 0 {
        let end = data.len().min(at + COPY_WRITE_BYTES);
        let n = usize::try_from(left).map_or(end - at, |l| l.min(end - at));
        conn.write_all(&data[at..at + n])?;
        left -= n as u64;
        at = if at + n == data.len() { 0 } else { at + n };
    }
    let mut ack = [0u8; 1];
    conn.read_exact(&mut ack)?;
    let ns = clock::monotonic_ns() - start;
    if ack[0] != ACK {
        return Err(BenchError::Protocol(format!(
            "the sink acknowledged with {:#04x}, not {ACK:#04x}",
            ack[0]
        )));
    }
    Ok(RawCopy { bytes, ns })
}

/// Where a sink puts the bytes it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkMemory {
    /// One `SINK_READ_BYTES` buffer, read into again and again: the
    /// socket's own speed, the bytes landing in memory already mapped.
    Reused,
    /// Memory never touched before, as much as the copy brings, each byte
    /// read to its own place: what a destination pays, whose every page
    /// lands in RAM that was never written (a first write of a page faults
    /// it in, microseconds here, see `/work/shared/machine-notes.md`).
    Fresh,
}

impl SinkMemory {
    /// The `bench-sink --memory` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkMemory::Reused => "reused",
            SinkMemory::Fresh => "fresh",
        }
    }
}

/// The sink's side of one copy on `conn`: an 8-byte big-endian length,
/// that many bytes (read as fast as the socket delivers them into
/// `memory`, then dropped), then one acknowledgement byte. Returns the
/// bytes read.
pub fn serve_copy(conn: &Connection, memory: SinkMemory) -> Result<u64, BenchError> {
    let mut header = [0u8; 8];
    conn.read_exact(&mut header)?;
    let want = u64::from_be_bytes(header);
    let len = match memory {
        SinkMemory::Reused => SINK_READ_BYTES,
        SinkMemory::Fresh => usize::try_from(want)
            .map_err(|_| BenchError::Protocol(format!("a copy of {want} bytes does not fit")))?,
    };
    // A large zeroed allocation is fresh anonymous memory from mmap (the
    // allocator does not write zeros the kernel already guarantees), so
    // no page of it is touched before the socket's bytes land there.
    let mut buf = vec![0u8; len];
    let mut got = 0u64;
    let mut at = 0usize;
    while got < want {
        let room = usize::try_from(want - got)
            .map_or(SINK_READ_BYTES, |l| l.min(SINK_READ_BYTES))
            .min(buf.len() - at);
        let n = conn.read(&mut buf[at..at + room])?;
        if n == 0 {
            return Err(BenchError::Protocol(format!(
                "the sender closed after {got} of {want} bytes"
            )));
        }
        got += n as u64;
        at = match memory {
            SinkMemory::Reused => 0,
            SinkMemory::Fresh => at + n,
        };
    }
    conn.write_all(&[ACK])?;
    Ok(got)
}

/// `livemig bench-sink`: listens on `listen`, prints `listening on URI` on
/// `announce`, and serves one copy into `memory`.
pub fn run_sink(
    listen: &MigrationUri,
    memory: SinkMemory,
    announce: &mut dyn Write,
) -> Result<u64, BenchError> {
    let listener = Listener::bind(listen)?;
    let uri = listener.local_uri()?;
    writeln!(announce, "listening on {uri}")
        .and_then(|()| announce.flush())
        .map_err(|e| BenchError::Sink(format!("could not announce its address: {e}")))?;
    let conn = listener.accept()?;
    serve_copy(&conn, memory)
}

/// Kills a child process that is still running when dropped (an early
/// return must not leave a sink behind).
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw TCP copy of `bytes` bytes of `data` to a fresh `livemig
/// bench-sink` child process of this same program, on 127.0.0.1, which
/// reads into `memory`.
pub fn raw_tcp_copy(bytes: u64, data: &[u8], memory: SinkMemory) -> Result<RawCopy, BenchError> {
    let exe = std::env::current_exe()
        .map_err(|e| BenchError::Sink(format!("could not be found: {e}")))?;
    let child = Command::new(exe)
        .args(["bench-sink", "--listen", "tcp:127.0.0.1:0"])
        .args(["--memory", memory.as_str()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError::Sink(format!("could not start: {e}")))?;
    let mut guard = ChildGuard(Some(child));
    let stdout = guard
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .ok_or_else(|| BenchError::Sink("has no stdout".into()))?;
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .map_err(|e| BenchError::Sink(format!("did not announce its address: {e}")))?;
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| BenchError::Sink(format!("said {:?}, not its address", first.trim())))?;
    let uri: MigrationUri = addr
        .parse()
        .map_err(|e| BenchError::Sink(format!("announced a bad address {addr}: {e}")))?;
    let copy = copy_to(&uri, bytes, data)?;
    let mut child = guard
        .0
        .take()
        .ok_or_else(|| BenchError::Sink("was lost track of".into()))?;
    let status = child
        .wait()
        .map_err(|e| BenchError::Sink(format!("could not be waited for: {e}")))?;
    if !status.success() {
        return Err(BenchError::Sink(format!("failed ({status})")));
    }
    Ok(copy)
}

/// One migration and its two baselines.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The migration as `livemig demo` reports it.
    pub summary: Summary,
    /// The raw TCP copy of the bytes the migration transferred.
    pub raw_same_bytes: RawCopy,
    /// The raw TCP copy of the guest's whole RAM.
    pub raw_all_ram: RawCopy,
}

impl RunResult {
    /// Total migration time in ms (the engine's `total-time`).
    pub fn total_ms(&self) -> f64 {
        self.summary.stats.total_time_ms as f64
    }

    /// Setup time in ms (start to the first dirty-log sync).
    pub fn setup_ms(&self) -> f64 {
        self.summary.stats.setup_time_ms as f64
    }

    /// Source vCPU stop to destination vCPU start, in ms.
    pub fn downtime_ms(&self) -> Option<f64> {
        self.summary.downtime_ms
    }

    /// Bytes the migration put on the wire.
    pub fn transferred(&self) -> u64 {
        self.summary.stats.ram.transferred
    }

    /// Guest RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.summary.stats.ram.total
    }

    /// Wire throughput: transferred bytes over the time after setup, in
    /// GB/s. `None` when that time rounds to 0 ms.
    pub fn migration_gbps(&self) -> Option<f64> {
        let ms = self.total_ms() - self.setup_ms();
        (ms > 0.0).then(|| gbps(self.transferred(), ms / 1e3))
    }

    /// Guest RAM moved per second of total time, in GB/s: how fast a guest
    /// of this size is moved, zero pages included.
    pub fn effective_gbps(&self) -> Option<f64> {
        let ms = self.total_ms();
        (ms > 0.0).then(|| gbps(self.ram_bytes(), ms / 1e3))
    }

    /// Migration wire throughput over the raw TCP copy's of the same bytes
    /// (1.0 = as fast as the socket alone).
    pub fn ratio(&self) -> Option<f64> {
        let raw = self.raw_same_bytes.gbps();
        self.migration_gbps().filter(|_| raw > 0.0).map(|m| m / raw)
    }

    /// How many times faster the migration moved the guest than a raw copy
    /// of all its RAM would (raw time over total time).
    pub fn vs_all_ram(&self) -> Option<f64> {
        let ms = self.total_ms();
        (ms > 0.0).then(|| self.raw_all_ram.seconds() * 1e3 / ms)
    }

    /// The migration completed and the destination matched the source.
    pub fn verified(&self) -> bool {
        self.summary.verified && self.summary.stats.status == MigrationStatus::Completed
    }

    /// The destination's digest time (part of the downtime), in ms.
    pub fn destination_digest_ms(&self) -> Option<f64> {
        self.summary
            .extra
            .get("destination")
            .and_then(|d| d.get("digest-time"))
            .and_then(Value::as_f64)
    }

    /// This run as one JSON object.
    pub fn to_json(&self) -> Value {
        let s = &self.summary;
        json!({
            "status": s.stats.status.as_str(),
            "verified": self.verified(),
            "total-time": self.total_ms(),
            "setup-time": self.setup_ms(),
            "downtime": self.downtime_ms(),
            "source-downtime": s.source_downtime_ms,
            "destination-digest-time": self.destination_digest_ms(),
            "transferred": self.transferred(),
            "ram-total": self.ram_bytes(),
            "normal-pages": s.stats.ram.normal,
            "zero-pages": s.stats.ram.duplicate,
            "iterations": s.stats.iterations,
            "throttle-ms": s.stats.throttle.throttled_ms,
            "throttle-peak-percent": s.stats.throttle.peak_percent,
            "throttle-taken-ms": s.stats.throttle.taken_ms,
            "migration-gbps": self.migration_gbps(),
            "effective-gbps": self.effective_gbps(),
            "raw-tcp-gbps": self.raw_same_bytes.gbps(),
            "raw-tcp-ms": self.raw_same_bytes.seconds() * 1e3,
            "ratio": self.ratio(),
            "raw-all-ram-s": self.raw_all_ram.seconds(),
            "raw-all-ram-gbps": self.raw_all_ram.gbps(),
            "vs-all-ram": self.vs_all_ram(),
            "error-desc": s.error_desc(),
            "downtime-breakdown": self.breakdown().cloned(),
        })
    }

    /// The run's `downtime-breakdown` (see [`crate::breakdown`]).
    pub fn breakdown(&self) -> Option<&Value> {
        self.summary.extra.get("downtime-breakdown")
    }

    /// One figure of the breakdown: `key` of the source's object, or of
    /// the destination's nested in it.
    fn breakdown_figure(&self, row: &BreakdownRow) -> Option<f64> {
        let b = self.breakdown()?;
        let obj = if row.destination {
            b.get("destination")?
        } else {
            b
        };
        obj.get(row.key)?.as_f64()
    }
}

/// One row of the breakdown table: a key of `downtime-breakdown` (of its
/// `destination` object when `destination`), and its unit.
struct BreakdownRow {
    key: &'static str,
    destination: bool,
    unit: &'static str,
}

/// The breakdown's rows, in the order of the stop.
fn breakdown_rows() -> Vec<BreakdownRow> {
    let source = StopPart::ALL.iter().map(|p| BreakdownRow {
        key: p.name(),
        destination: false,
        unit: "ms",
    });
    let counts = [
        ("final-pages-count", "pages"),
        ("final-pages-bytes", "bytes"),
        ("device-state-bytes", "bytes"),
    ]
    .into_iter()
    .map(|(key, unit)| BreakdownRow {
        key,
        destination: false,
        unit,
    });
    let destination = DESTINATION_PARTS.iter().map(|&key| BreakdownRow {
        key,
        destination: true,
        unit: "ms",
    });
    source.chain(counts).chain(destination).collect()
}

/// Median, minimum and maximum of a set of measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// The middle value (mean of the two middle ones for an even count).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` if there are none (or any is NaN).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() || v.iter().any(|x| x.is_nan()) {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// `{"median", "min", "max"}`.
    pub fn to_json(self) -> Value {
        json!({ "median": self.median, "min": self.min, "max": self.max })
    }
}

/// Every run of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case as run (scaled, if it was).
    pub case: BenchCase,
    /// One entry per run, in order.
    pub runs: Vec<RunResult>,
}

/// The metrics of a case, in table order: JSON name, column title, digits
/// after the point, and how to read it from a run. The table and the JSON
/// are built from this one list so they cannot disagree.
pub(crate) type Metric = (
    &'static str,
    &'static str,
    usize,
    fn(&RunResult) -> Option<f64>,
);

const METRICS: [Metric; 12] = [
    ("total-time", "total ms", 0, |r| Some(r.total_ms())),
    ("downtime", "downtime ms", 1, RunResult::downtime_ms),
    ("source-downtime", "src down ms", 1, |r| {
        r.summary.source_downtime_ms
    }),
    ("throttle-ms", "throttle ms", 1, |r| {
        Some(r.summary.stats.throttle.throttled_ms)
    }),
    ("throttle-peak-percent", "peak %", 0, |r| {
        Some(f64::from(r.summary.stats.throttle.peak_percent))
    }),
    ("transferred-mib", "sent MiB", 1, |r| {
        Some(r.transferred() as f64 / MIB as f64)
    }),
    ("migration-gbps", "migr GB/s", 2, RunResult::migration_gbps),
    ("raw-tcp-gbps", "raw TCP GB/s", 2, |r| {
        Some(r.raw_same_bytes.gbps())
    }),
    ("ratio", "ratio", 2, RunResult::ratio),
    ("effective-gbps", "eff GB/s", 1, RunResult::effective_gbps),
    ("raw-all-ram-s", "raw RAM s", 2, |r| {
        Some(r.raw_all_ram.seconds())
    }),
    ("vs-all-ram", "vs RAM x", 1, RunResult::vs_all_ram),
];

impl CaseResult {
    /// Every run completed and verified.
    pub fn verified(&self) -> bool {
        !self.runs.is_empty() && self.runs.iter().all(RunResult::verified)
    }

    /// The spread of one metric over the runs that have it.
    pub fn spread(&self, metric: fn(&RunResult) -> Option<f64>) -> Option<Spread> {
        Spread::of(self.runs.iter().filter_map(metric))
    }

    /// The spread of one breakdown figure over the runs that have it.
    fn breakdown_spread(&self, row: &BreakdownRow) -> Option<Spread> {
        Spread::of(self.runs.iter().filter_map(|r| r.breakdown_figure(row)))
    }

    /// `downtime-breakdown` over the runs: each figure's median, min and
    /// max, the destination's under `destination`.
    fn breakdown_json(&self) -> Value {
        let (mut source, mut destination) = (Map::new(), Map::new());
        for row in breakdown_rows() {
            let v = self
                .breakdown_spread(&row)
                .map_or(Value::Null, Spread::to_json);
            let side = if row.destination {
                &mut destination
            } else {
                &mut source
            };
            side.insert(row.key.into(), v);
        }
        source.insert("destination".into(), Value::Object(destination));
        Value::Object(source)
    }

    /// The run whose downtime is the median of the case's (the lower of
    /// the two middle ones for an even count): the one `--timeline` draws.
    pub fn median_downtime_run(&self) -> Option<&RunResult> {
        let mut runs: Vec<(f64, &RunResult)> = self
            .runs
            .iter()
            .filter_map(|r| Some((r.downtime_ms()?, r)))
            .collect();
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = runs.len();
        runs.get(n.saturating_sub(1) / 2).map(|r| r.1)
    }

    /// The case as one JSON object: its shape, each metric's median, min
    /// and max, the verdict, and every run.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("case".into(), json!(self.case.name));
        obj.insert("mem-mib".into(), json!(self.case.mem_mib));
        obj.insert("dirty-mib".into(), json!(self.case.dirty_mib));
        obj.insert("runs".into(), json!(self.runs.len()));
        for (name, _, _, metric) in METRICS {
            let v = self.spread(metric).map_or(Value::Null, Spread::to_json);
            obj.insert(name.into(), v);
        }
        obj.insert("verified".into(), json!(self.verified()));
        obj.insert("downtime-breakdown".into(), self.breakdown_json());
        obj.insert(
            "run-results".into(),
            Value::Array(self.runs.iter().map(RunResult::to_json).collect()),
        );
        Value::Object(obj)
    }
}

/// The results as a text table: one row of medians per case, then one row
/// of min..max per case, then what each column means.
pub fn table(results: &[CaseResult]) -> String {
    let mut head = vec!["case".to_string(), "runs".to_string()];
    head.extend(METRICS.iter().map(|m| m.1.to_string()));
    head.push("verified".into());
    let mut rows = vec![head];
    for r in results {
        let mut row = vec![r.case.name.to_string(), r.runs.len().to_string()];
        for (_, _, digits, metric) in METRICS {
            row.push(
                r.spread(metric)
                    .map_or("-".into(), |s| format!("{:.*}", digits, s.median)),
            );
        }
        row.push(r.verified().to_string());
        rows.push(row);
    }
    for r in results {
        let mut row = vec![r.case.name.to_string(), "min..max".to_string()];
        for (_, _, digits, metric) in METRICS {
            row.push(r.spread(metric).map_or("-".into(), |s| {
                format!("{:.*}..{:.*}", digits, s.min, digits, s.max)
            }));
        }
        row.push(String::new());
        rows.push(row);
    }
    let mut out = String::new();
    // A blank line between the medians and the min..max block.
    for (i, line) in columns(&rows).lines().enumerate() {
        if i == results.len() + 1 {
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    for r in results {
        out.push_str(&format!(
            "\n{}: {} MiB guest, {} MiB working set",
            r.case.name, r.case.mem_mib, r.case.dirty_mib
        ));
    }
    out.push_str(LEGEND);
    out
}

/// Where the stop went, per case: one row per part of
/// `downtime-breakdown` (source parts, the counts of what the stop sent,
/// then the destination's parts) with median, min and max over the runs.
pub fn breakdown_table(results: &[CaseResult]) -> String {
    let mut out = String::new();
    for r in results {
        out.push_str(&format!(
            "\n{}: where the stop goes (median, min, max over {} runs)\n",
            r.case.name,
            r.runs.len()
        ));
        out.push_str(&format!(
            "  {:<26} {:>12} {:>12} {:>12}  unit\n",
            "part", "median", "min", "max"
        ));
        for row in breakdown_rows() {
            let name = if row.destination {
                format!("destination {}", row.key)
            } else {
                format!("source {}", row.key)
            };
            let digits = if row.unit == "ms" { 3 } else { 0 };
            let cells = r.breakdown_spread(&row).map_or_else(
                || format!("{:>12} {:>12} {:>12}", "-", "-", "-"),
                |s| {
                    format!(
                        "{:>12.*} {:>12.*} {:>12.*}",
                        digits, s.median, digits, s.min, digits, s.max
                    )
                },
            );
            out.push_str(&format!("  {name:<26} {cells}  {}\n", row.unit));
        }
    }
    out.push_str(BREAKDOWN_LEGEND);
    out
}

const BREAKDOWN_LEGEND: &str = "
source parts tile the source downtime (vCPU stop requested to the destination's confirmation):
  vcpu-stop      stop requested to every vCPU paused and the devices quiesced
  final-sync     the last dirty-log sync (and a pre-switchover pause, if asked for)
  final-pages    the pages still dirty handed to the socket (count and stream bytes below)
  device-state   device state saved and handed to the socket
  end-of-stream  end-of-stream record written to the destination's confirmation
destination parts tile its share (end of stream read to its vCPUs started):
  commit         LOADED answered to the source's COMMIT received and answered
  digest         memory digest of the loaded guest (the demo's check)
  vcpu-start     starting the vCPUs
";

const LEGEND: &str = "

total ms      migration total-time (engine start to the destination's confirmation)
downtime ms   source vCPU stop to destination vCPU start (across the two processes)
src down ms   source vCPU stop to the destination's confirmation of the whole stream
throttle ms   how long the running source guest was throttled to shorten the stop
peak %        the highest throttle: share of each vCPU's time held back
sent MiB      bytes the migration put on the wire (records, headers, pages)
migr GB/s     sent bytes / (total time - setup time)
raw TCP GB/s  the same number of bytes copied over 127.0.0.1 to another process, same run
ratio         migr GB/s / raw TCP GB/s (1.00 = as fast as the socket alone)
eff GB/s      guest RAM size / total time (zero pages count as moved)
raw RAM s     seconds a raw TCP copy of all guest RAM took, same run
vs RAM x      raw RAM time / total time (how much faster than copying all RAM)
";

/// Runs `case` `opts.runs` times: each run is a verified migration as
/// `livemig demo` does it, then the two raw copies. `data` is the raw
/// copies' source buffer (see [`guest_like_data`]).
pub fn run_case(
    case: BenchCase,
    opts: &BenchOptions,
    config: &MigrationConfig,
    data: &[u8],
    cancel: &Cancel,
) -> Result<CaseResult, BenchError> {
    if opts.runs == 0 {
        return Err(BenchError::NoRuns);
    }
    let mut runs = Vec::new();
    for i in 1..=opts.runs {
        runs.push(run_one(case, i, opts, config, data, cancel)?);
    }
    Ok(CaseResult { case, runs })
}

/// The guest shape of `case` with the options' vCPUs.
pub fn shape(case: BenchCase, opts: &BenchOptions) -> GuestShape {
    GuestShape {
        mem_mib: case.mem_mib,
        dirty_mib: case.dirty_mib,
        dirty_log: DirtyLogMode::ManualProtect,
        vcpus: opts.vcpus,
        fill: false,
    }
}

/// How a bench run checks the destination's memory: by the in-protocol
/// verification, which puts no second digest of all RAM inside the stop
/// the bench measures; a run with verification off (`--no-verify`) by the
/// digest of the pages the destination guest did not write, taken after
/// its watch, so that its stop holds no digest either.
pub fn memory_check(opts: &BenchOptions) -> MemoryCheck {
    if opts.source.verify {
        MemoryCheck::InProtocol
    } else {
        MemoryCheck::Unwritten
    }
}

/// Run `i` of `case`: a verified migration as `livemig demo` does it, then
/// the two raw copies.
pub fn run_one(
    case: BenchCase,
    i: u32,
    opts: &BenchOptions,
    config: &MigrationConfig,
    data: &[u8],
    cancel: &Cancel,
) -> Result<RunResult, BenchError> {
    let summary = demo::run_demo_with(
        shape(case, opts),
        config,
        opts.source.clone(),
        memory_check(opts),
        false,
        opts.warmup,
        opts.run_for,
        None,
        cancel,
        &mut Progress::quiet(),
    )?;
    if cancel.is_cancelled() || summary.stats.status == MigrationStatus::Cancelled {
        return Err(BenchError::Cancelled);
    }
    let raw_same_bytes = raw_tcp_copy(summary.stats.ram.transferred, data, SinkMemory::Reused)?;
    let raw_all_ram = raw_tcp_copy(summary.stats.ram.total, data, SinkMemory::Reused)?;
    let run = RunResult {
        summary,
        raw_same_bytes,
        raw_all_ram,
    };
    if opts.verbose {
        eprintln!(
            "bench: {} run {i}/{}: total {} ms, downtime {} ms, ratio {}, verified {}",
            case.name,
            opts.runs,
            run.total_ms(),
            run.downtime_ms().map_or("-".into(), |d| format!("{d:.1}")),
            run.ratio().map_or("-".into(), |r| format!("{r:.2}")),
            run.verified()
        );
    }
    Ok(run)
}

/// The multifd case's name (`--case multifd`).
pub const MULTIFD_CASE: &str = "multifd";

/// One multifd migration of a guest whose RAM is all non-zero pages, and
/// the raw TCP baseline of as many parallel streams, run back to back.
#[derive(Debug, Clone)]
pub struct ChannelRun {
    /// Channels the migration used.
    pub channels: u8,
    /// Whether the destination preallocated its RAM at start-up (`receive
    /// --mem-prealloc`), so that no page landed in memory never touched.
    pub prealloc: bool,
    /// The migration as `livemig demo` reports it.
    pub summary: Summary,
    /// `channels` raw TCP copies side by side, each of its share of the
    /// migration's page bytes: the slowest one's time.
    pub raw: RawCopy,
    /// The same copies, each sink reading into memory never touched
    /// before ([`SinkMemory::Fresh`]), as the destination does.
    pub raw_fresh: RawCopy,
}

impl ChannelRun {
    /// Page payload (normal-page bytes) per second of the migration after
    /// setup, GB/s.
    pub fn payload_gbps(&self) -> Option<f64> {
        let s = &self.summary.stats;
        let ms = s.total_time_ms.saturating_sub(s.setup_time_ms) as f64;
        (ms > 0.0).then(|| gbps(s.ram.normal_bytes, ms / 1e3))
    }

    /// Field `key` of the destination's own report.
    fn destination(&self, key: &str) -> Option<&Value> {
        self.summary.extra.get("destination")?.get(key)
    }

    /// This run as one JSON object.
    pub fn to_json(&self) -> Value {
        let s = &self.summary.stats;
        json!({
            "channels": self.channels,
            "mem-prealloc": self.prealloc,
            "mem-prealloc-ms": self.destination("mem-prealloc-ms"),
            "mem-prealloc-when": self.destination("mem-prealloc-when"),
            "status": s.status.as_str(),
            "verified": self.summary.verified,
            "total-time": s.total_time_ms,
            "setup-time": s.setup_time_ms,
            "normal-bytes": s.ram.normal_bytes,
            "multifd-bytes": s.ram.multifd_bytes,
            "payload-gbps": self.payload_gbps(),
            "raw-tcp-streams-gbps": self.raw.gbps(),
            "raw-tcp-streams-fresh-gbps": self.raw_fresh.gbps(),
            "error-desc": self.summary.error_desc(),
        })
    }
}

/// `streams` raw TCP copies at once, to a sink child each (reading into
/// `memory`), of `bytes` in total: the combined bytes over the slowest
/// copy's time.
pub fn parallel_raw_copies(
    streams: u8,
    bytes: u64,
    data: &[u8],
    memory: SinkMemory,
) -> Result<RawCopy, BenchError> {
    let share = bytes / u64::from(streams.max(1));
    let copies = std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams.max(1))
            .map(|_| s.spawn(|| raw_tcp_copy(share, data, memory)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Protocol("a copy thread panicked".into())))
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    Ok(RawCopy {
        bytes: copies.iter().map(|c| c.bytes).sum(),
        ns: copies.iter().map(|c| c.ns).max().unwrap_or(0),
    })
}

/// The multifd case: a `mem_mib` guest whose RAM is all non-zero pages
/// (filled before boot, idle, so one pass moves it), migrated over each of
/// `channel_counts` channels in turn, into a fresh destination and into
/// one that preallocated its RAM at start-up, each migration followed by
/// the same page bytes over as many parallel raw TCP streams; `opts.runs`
/// rounds, alternating.
pub fn run_multifd(
    mem_mib: u64,
    channel_counts: &[u8],
    opts: &BenchOptions,
    config: &MigrationConfig,
    data: &[u8],
    cancel: &Cancel,
) -> Result<Vec<ChannelRun>, BenchError> {
    if opts.runs == 0 {
        return Err(BenchError::NoRuns);
    }
    let shape = GuestShape {
        mem_mib,
        dirty_mib: 0,
        dirty_log: DirtyLogMode::ManualProtect,
        vcpus: opts.vcpus,
        fill: true,
    };
    let mut runs = Vec::new();
    for round in 1..=opts.runs {
        for (&channels, prealloc) in channel_counts.iter().flat_map(|c| [(c, false), (c, true)]) {
            let mut config = config.clone();
            config.capabilities |= livemig_core::capabilities::Capabilities::MULTIFD;
            config.parameters.multifd_channels = channels;
            let summary = demo::run_demo_with(
                shape,
                &config,
                opts.source.clone(),
                memory_check(opts),
                prealloc,
                opts.warmup,
                opts.run_for,
                None,
                cancel,
                &mut Progress::quiet(),
            )?;
            if cancel.is_cancelled() || summary.stats.status == MigrationStatus::Cancelled {
                return Err(BenchError::Cancelled);
            }
            let bytes = summary.stats.ram.normal_bytes;
            let raw = parallel_raw_copies(channels, bytes, data, SinkMemory::Reused)?;
            let raw_fresh = parallel_raw_copies(channels, bytes, data, SinkMemory::Fresh)?;
            let run = ChannelRun {
                channels,
                prealloc,
                summary,
                raw,
                raw_fresh,
            };
            if opts.verbose {
                eprintln!(
                    "bench: multifd round {round}/{}: {channels} channels{}, payload {} GB/s, \
                     raw {channels} streams {:.2} GB/s ({:.2} into fresh memory), verified {}",
                    opts.runs,
                    if prealloc {
                        " into preallocated RAM"
                    } else {
                        ""
                    },
                    run.payload_gbps().map_or("-".into(), |g| format!("{g:.2}")),
                    run.raw.gbps(),
                    run.raw_fresh.gbps(),
                    run.summary.verified
                );
            }
            runs.push(run);
        }
    }
    Ok(runs)
}

/// The multifd results as a table: per channel count, the median payload
/// rate into a fresh destination and into a preallocated one, the raw TCP
/// rates into reused and into fresh memory, the ratios, and the speed-ups
/// over one channel and one raw stream.
pub fn multifd_table(runs: &[ChannelRun]) -> String {
    let mut counts: Vec<u8> = runs.iter().map(|r| r.channels).collect();
    counts.sort_unstable();
    counts.dedup();
    let median = |c: u8, prealloc: Option<bool>, f: &dyn Fn(&ChannelRun) -> Option<f64>| {
        Spread::of(
            runs.iter()
                .filter(|r| r.channels == c && prealloc.is_none_or(|p| r.prealloc == p))
                .filter_map(f),
        )
        .map(|s| s.median)
    };
    let raw = |r: &ChannelRun| Some(r.raw.gbps());
    let fresh = |r: &ChannelRun| Some(r.raw_fresh.gbps());
    let prealloc_ms = |r: &ChannelRun| r.destination("mem-prealloc-ms").and_then(Value::as_f64);
    let one = median(1, Some(false), &ChannelRun::payload_gbps);
    let one_pre = median(1, Some(true), &ChannelRun::payload_gbps);
    let one_raw = median(1, None, &raw);
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    let ratio = |a: Option<f64>, b: Option<f64>| fmt(a.zip(b).map(|(a, b)| a / b));
    let mut rows = vec![
        [
            "channels",
            "fresh GB/s",
            "prealloc GB/s",
            "raw TCP GB/s",
            "fresh vs raw",
            "prealloc vs raw",
            "raw fresh GB/s",
            "fresh vs raw fresh",
            "fresh vs 1 ch",
            "prealloc vs 1 ch",
            "raw vs 1 stream",
            "prealloc ms",
            "verified",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in counts {
        let payload = median(c, Some(false), &ChannelRun::payload_gbps);
        let pre = median(c, Some(true), &ChannelRun::payload_gbps);
        let (raw, fresh) = (median(c, None, &raw), median(c, None, &fresh));
        let verified = runs
            .iter()
            .filter(|r| r.channels == c)
            .all(|r| r.summary.verified);
        rows.push(vec![
            c.to_string(),
            fmt(payload),
            fmt(pre),
            fmt(raw),
            ratio(payload, raw),
            ratio(pre, raw),
            fmt(fresh),
            ratio(payload, fresh),
            ratio(payload, one),
            ratio(pre, one_pre),
            ratio(raw, one_raw),
            median(c, Some(true), &prealloc_ms).map_or("-".into(), |v| format!("{v:.0}")),
            verified.to_string(),
        ]);
    }
    let mut out = columns(&rows);
    out.push_str(
        "\nfresh GB/s: normal-page bytes / (total - setup time) of a guest whose RAM is all \
         non-zero pages, into a destination whose RAM was never touched;\nprealloc GB/s: the \
         same into a destination that preallocated all its RAM at its start-up (receive \
         --mem-prealloc), before it announced its address: not in the migration's time, its \
         own is `prealloc ms`;\nraw TCP: the same bytes over as many parallel streams to sink \
         processes, each reading into one reused buffer;\nraw fresh: the same again, each sink \
         reading into memory never touched before;\nsame run, alternating (medians; raw over \
         the runs of both kinds)\n",
    );
    out
}

/// Right-aligned columns (the first left-aligned), two spaces apart.
pub(crate) fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..n)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                if c == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_core::stats::MigrationStats;

    #[test]
    fn cases_are_named_and_scale_in_proportion() {
        let busy = BenchCase::by_name("busy-1g").unwrap();
        assert_eq!((busy.mem_mib, busy.dirty_mib), (1024, 64));
        assert_eq!(busy.scaled(256).dirty_mib, 16);
        assert_eq!(
            busy.scaled(8).dirty_mib,
            1,
            "a working set stays a working set"
        );
        let idle = BenchCase::by_name("idle-4g").unwrap().scaled(256);
        assert_eq!(
            (idle.name, idle.mem_mib, idle.dirty_mib),
            ("idle-4g", 256, 0)
        );
        assert_eq!(BenchCase::by_name("warp-9"), None);
    }

    #[test]
    fn spread_takes_median_min_and_max() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert_eq!(Spread::of([]), None);
        assert_eq!(Spread::of([1.0, f64::NAN]), None);
    }

    #[test]
    fn guest_like_data_has_no_zero_page_and_exact_length() {
        let d = guest_like_data(3 * 4096 + 5);
        assert_eq!(d.len(), 3 * 4096 + 5);
        assert!(d.chunks(4096).all(|p| p.iter().any(|&b| b != 0)));
        assert_eq!(d, guest_like_data(3 * 4096 + 5));
    }

    #[test]
    fn raw_copy_delivers_every_byte_and_times_it() {
        for memory in [SinkMemory::Reused, SinkMemory::Fresh] {
            let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
            let uri = listener.local_uri().unwrap();
            let sink = std::thread::spawn(move || serve_copy(&listener.accept().unwrap(), memory));
            // Not a multiple of the buffer: the cycle wraps mid-buffer.
            let data = guest_like_data(1 << 20);
            let bytes = 5 * (1 << 20) + 123;
            let copy = copy_to(&uri, bytes, &data).unwrap();
            assert_eq!(sink.join().unwrap().unwrap(), bytes, "{memory:?}");
            assert_eq!(copy.bytes, bytes);
            assert!(copy.ns > 0 && copy.gbps() > 0.0, "{copy:?}");
        }
    }

    #[test]
    fn a_sender_that_stops_early_is_named() {
        let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let uri = listener.local_uri().unwrap();
        let sink =
            std::thread::spawn(move || serve_copy(&listener.accept().unwrap(), SinkMemory::Fresh));
        let conn = Connection::connect(&uri).unwrap();
        conn.write_all(&1000u64.to_be_bytes()).unwrap();
        conn.write_all(&[1u8; 10]).unwrap();
        drop(conn);
        let e = sink.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("after 10 of 1000 bytes"), "{e}");
    }

    fn run(total_ms: u64, transferred: u64, raw_ms: u64, verified: bool) -> RunResult {
        let mut stats = MigrationStats {
            status: MigrationStatus::Completed,
            total_time_ms: total_ms,
            ..MigrationStats::default()
        };
        stats.ram.transferred = transferred;
        stats.ram.total = 1 << 30;
        RunResult {
            summary: Summary {
                stats,
                downtime_ms: Some(12.0),
                verified,
                ..Summary::default()
            },
            raw_same_bytes: RawCopy {
                bytes: transferred,
                ns: raw_ms * 1_000_000,
            },
            raw_all_ram: RawCopy {
                bytes: 1 << 30,
                ns: 500_000_000,
            },
        }
    }

    #[test]
    fn metrics_are_ratios_of_the_same_run() {
        let r = run(400, 200_000_000, 100, true);
        assert!((r.migration_gbps().unwrap() - 0.5).abs() < 1e-9);
        assert!((r.raw_same_bytes.gbps() - 2.0).abs() < 1e-9);
        assert!((r.ratio().unwrap() - 0.25).abs() < 1e-9);
        let eff = (1u64 << 30) as f64 / 0.4 / 1e9;
        assert!((r.effective_gbps().unwrap() - eff).abs() < 1e-9);
        assert!((r.vs_all_ram().unwrap() - 1.25).abs() < 1e-9);
        let zero = run(0, 1000, 1, true);
        assert_eq!((zero.migration_gbps(), zero.ratio()), (None, None));
    }

    #[test]
    fn table_and_json_carry_the_ratio_and_the_verdict() {
        let case = CaseResult {
            case: CASES[1],
            runs: vec![
                run(400, 200_000_000, 100, true),
                run(500, 200_000_000, 100, true),
                run(300, 200_000_000, 100, true),
            ],
        };
        assert!(case.verified());
        let text = table(std::slice::from_ref(&case));
        assert!(text.contains("ratio") && text.contains("0.25"), "{text}");
        assert!(text.contains("300..500"), "{text}");
        assert!(text.contains("true"), "{text}");
        let v = case.to_json();
        assert_eq!(v["case"], "busy-1g");
        assert_eq!(v["total-time"]["median"], 400.0);
        assert_eq!(v["ratio"]["min"], 0.2);
        assert_eq!(v["verified"], true);
        assert_eq!(v["run-results"].as_array().unwrap().len(), 3);

        let mut bad = case.clone();
        bad.runs[1].summary.verified = false;
        assert!(!bad.verified());
        assert_eq!(bad.to_json()["verified"], false);
    }

    #[test]
    fn the_breakdown_is_spread_over_the_runs_and_the_median_run_is_drawn() {
        let with = |downtime: f64, pages_ms: f64, digest_ms: f64| {
            let mut r = run(400, 200_000_000, 100, true);
            r.summary.downtime_ms = Some(downtime);
            r.summary.extra.insert(
                "downtime-breakdown".into(),
                json!({"final-pages": pages_ms, "destination": {"digest": digest_ms}}),
            );
            r
        };
        let case = CaseResult {
            case: CASES[1],
            runs: vec![
                with(30.0, 3.0, 20.0),
                with(10.0, 1.0, 5.0),
                with(20.0, 2.0, 9.0),
            ],
        };
        let v = case.to_json();
        let b = &v["downtime-breakdown"];
        assert_eq!(b["final-pages"]["median"], 2.0);
        assert_eq!(b["final-pages"]["max"], 3.0);
        assert_eq!(b["destination"]["digest"]["min"], 5.0);
        assert_eq!(b["vcpu-stop"], Value::Null, "no run has it");
        assert_eq!(
            v["run-results"][0]["downtime-breakdown"]["final-pages"],
            3.0
        );
        let text = breakdown_table(std::slice::from_ref(&case));
        assert!(
            text.contains("source final-pages") && text.contains("2.000"),
            "{text}"
        );
        assert!(text.contains("destination digest"), "{text}");
        let median = case.median_downtime_run().unwrap();
        assert_eq!(median.downtime_ms(), Some(20.0));
        let even = CaseResult {
            case: CASES[1],
            runs: case.runs[..2].to_vec(),
        };
        assert_eq!(
            even.median_downtime_run().unwrap().downtime_ms(),
            Some(10.0),
            "the lower middle one"
        );
    }
}
