//! `livemig bench --case postcopy`: postcopy's fault latency against the
//! userfaultfd round trip measured in the same run, and postcopy's
//! downtime.
//!
//! A fault latency on its own says little (it moves with the machine's
//! load), so each round measures, back to back:
//!
//! 1. the **userfaultfd round trip**: a thread touches a missing page of
//!    memory registered with livemig's own userfaultfd layer
//!    ([`PostcopyRam`] and its
//!    [`FaultThread`](livemig_kvm::postcopy::FaultThread): `poll`, read
//!    the event, `UFFDIO_COPY`, wake), and the fault thread places the
//!    page itself; the toucher's time from the touch to its resume. What
//!    a fault costs with no migration behind it: the floor.
//! 2. the same **over loopback TCP**: the fault thread asks a server
//!    thread for the page (an 8-byte request, a 4 KiB answer, over the
//!    transport's [`Connection`], so `TCP_NODELAY` and buffer sizes are
//!    the migration's) before placing it: the floor for a fault that must
//!    cross one network round trip, as every postcopy request does.
//! 3. a **postcopy migration** of a busy 1 GiB guest as `livemig demo
//!    --mode postcopy` does it (the switch after the first precopy pass),
//!    with `postcopy-preempt` on and the background pass unlimited; the
//!    destination's fault latency is per request, from the fault event
//!    read by its fault thread to the page placed. The first pass is
//!    held to [`PRECOPY_PASS_SECONDS`] over the working set (see
//!    [`postcopy_config`]), so that the guest finds missing pages ahead of
//!    it after the switch: hundreds of requests a round.
//!
//! Every figure is a percentile of the samples of all rounds pooled (the
//! baselines' faults, the migrations' requests): a round's median of its
//! own few requests is noise, and medians of rounds do not make the
//! median of all requests. The downtime is one figure a round, so it is
//! given as the median, minimum and maximum of the rounds.
//! The migration's span starts later than the baselines' touch (at the
//! fault thread's read: the kernel's delivery and the fault thread's
//! wake-up are outside it) but its end, the books' placement, comes after
//! the wake-up of the faulting thread (measured: the bare round trip's
//! read → placed exceeds its touch → resume), so the ratio to touch →
//! resume is not a bound either way; the baselines report the same span
//! (read → placed) beside their touch → resume for the like-for-like
//! comparison.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use livemig_core::capabilities::Capabilities;
use livemig_core::config::MigrationConfig;
use livemig_core::stats::nearest_rank;
use livemig_core::status::MigrationStatus;
use livemig_kvm::clock;
use livemig_kvm::memory::{GuestMemory, MemoryError, PAGE_SIZE, RegionLayout};
use livemig_kvm::postcopy::{Fault, PostcopyError, PostcopyRam};
use livemig_kvm::transport::{Connection, Listener, MigrationUri, TransportError};
use serde_json::{Value, json};

use crate::bench::{BenchCase, BenchError, BenchOptions, Spread, columns, memory_check, shape};
use crate::demo::{self, DemoError};
use crate::interrupt::Cancel;
use crate::report::{Progress, Summary};

/// The case's name (`--case postcopy`).
pub const POSTCOPY_CASE: &str = "postcopy";

/// The guest the case migrates: the busy 1 GiB guest of `busy-1g`.
pub const POSTCOPY_GUEST: BenchCase = BenchCase {
    name: POSTCOPY_CASE,
    mem_mib: 1024,
    dirty_mib: 64,
};

/// Faults timed per baseline and round.
pub const ROUND_TRIPS: usize = 500;

/// How long the first precopy pass takes over the working set (its
/// `max-bandwidth`, unless given, is the working set over this).
///
/// The demo guest stamps its pages in ascending order, a generation every
/// 1-2 s here (its dirty rate: 8 000-14 000 pages/s), and the background
/// pass after the switch goes in ascending order too. With an unlimited
/// first pass (0.2 s) only the pages written since their send are
/// missing at the switch, all behind the guest, and the background pass
/// delivers them before the guest comes round again: 2-6 requests a
/// migration, measured. A pass that takes longer than a generation leaves
/// the guest's next pages missing too: 180 requests, measured, at 2 s.
pub const PRECOPY_PASS_SECONDS: u64 = 2;

/// Pause between two timed faults, so that each finds the fault thread
/// asleep in `poll`, as a migration's faults do (its requests take longer
/// than the thread would wait awake). Back to back, the next fault is
/// often read before the thread sleeps: measured 11 us then, against
/// 25-340 us with the pause, under the same load.
const BETWEEN_FAULTS: Duration = Duration::from_micros(200);

const PAGE: u64 = PAGE_SIZE as u64;

/// What the fault thread places from memory at hand, and what the page
/// server sends: the toucher checks it read the one it was given.
const LOCAL_BYTE: u8 = 0x5a;
const SERVED_BYTE: u8 = 0xa5;

/// Why a baseline could not be measured.
#[derive(Debug)]
pub enum RoundTripError {
    /// The probe memory could not be mapped.
    Memory(MemoryError),
    /// Registering it or serving its faults failed.
    Postcopy(PostcopyError),
    /// The loopback page server's socket failed.
    Transport(TransportError),
    /// The page server thread panicked.
    ServerPanicked,
    /// No fault was timed (none asked for, or none reached the fault
    /// thread).
    NoFaults,
    /// The touched page did not hold what was placed (guest-physical
    /// address of the page).
    WrongPage(u64),
}

impl fmt::Display for RoundTripError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoundTripError::Memory(e) => write!(f, "userfaultfd round trip: probe memory: {e}"),
            RoundTripError::Postcopy(e) => write!(f, "userfaultfd round trip: {e}"),
            RoundTripError::Transport(e) => {
                write!(f, "userfaultfd round trip over TCP: {e}")
            }
            RoundTripError::ServerPanicked => {
                f.write_str("userfaultfd round trip over TCP: the page server panicked")
            }
            RoundTripError::NoFaults => f.write_str("userfaultfd round trip: no fault was timed"),
            RoundTripError::WrongPage(gpa) => write!(
                f,
                "userfaultfd round trip: page {gpa:#x} does not hold the bytes placed"
            ),
        }
    }
}

impl std::error::Error for RoundTripError {}

/// Why the postcopy case could not produce its numbers.
#[derive(Debug)]
pub enum FaultBenchError {
    /// A baseline failed.
    RoundTrip(RoundTripError),
    /// The migration failed to run (or `--runs 0`, or a cancel).
    Bench(BenchError),
}

impl fmt::Display for FaultBenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultBenchError::RoundTrip(e) => write!(f, "bench --case postcopy: {e}"),
            FaultBenchError::Bench(e) => write!(f, "bench --case postcopy: {e}"),
        }
    }
}

impl std::error::Error for FaultBenchError {}

impl From<RoundTripError> for FaultBenchError {
    fn from(e: RoundTripError) -> Self {
        FaultBenchError::RoundTrip(e)
    }
}

impl From<DemoError> for FaultBenchError {
    fn from(e: DemoError) -> Self {
        FaultBenchError::Bench(BenchError::Demo(e))
    }
}

/// Percentiles of a set of latencies, microseconds, and how many there
/// were.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Samples.
    pub samples: usize,
    /// The median (nearest rank, as all three).
    pub median_us: f64,
    /// The 90th percentile.
    pub p90_us: f64,
    /// The 99th percentile.
    pub p99_us: f64,
}

impl Latency {
    /// The latency of `ns` samples (`None` when there are none).
    pub fn of_ns(mut ns: Vec<u64>) -> Option<Latency> {
        ns.sort_unstable();
        let us = |pct: u8| nearest_rank(&ns, pct).map(|v| v as f64 / 1000.0);
        Some(Latency {
            samples: ns.len(),
            median_us: us(50)?,
            p90_us: us(90)?,
            p99_us: us(99)?,
        })
    }
}

/// One baseline's samples, nanoseconds: what the toucher saw, and the
/// fault thread's own span.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundTrip {
    /// Touch → resume, on the faulting thread.
    pub touch_ns: Vec<u64>,
    /// Fault event read → page placed, from the userfaultfd layer's books
    /// (the span the migration's fault latency covers).
    pub read_to_placed_ns: Vec<u64>,
}

/// How the fault thread gets the page it places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSource {
    /// From memory at hand: the bare userfaultfd round trip.
    Local,
    /// From a server thread over loopback TCP: one request, one page.
    LoopbackTcp,
}

/// Times `faults` faults on fresh pages, each resolved by the fault thread
/// from `source`.
pub fn round_trip(source: PageSource, faults: usize) -> Result<RoundTrip, RoundTripError> {
    if faults == 0 {
        return Err(RoundTripError::NoFaults);
    }
    let len = faults as u64 * PAGE;
    let layout =
        RegionLayout::contiguous("fault-probe", len, len).map_err(RoundTripError::Memory)?;
    let memory = GuestMemory::anonymous(&layout).map_err(RoundTripError::Memory)?;
    let ram = Arc::new(PostcopyRam::register(memory).map_err(RoundTripError::Postcopy)?);
    let server = match source {
        PageSource::Local => None,
        PageSource::LoopbackTcp => Some(PageServer::start()?),
    };
    let conn = match &server {
        Some(s) => Some(Connection::connect(&s.uri).map_err(RoundTripError::Transport)?),
        None => None,
    };
    // A placement that fails would leave the toucher blocked forever: the
    // fault thread then unregisters the memory (which wakes it) and keeps
    // the error.
    let failed: Arc<Mutex<Option<RoundTripError>>> = Arc::default();
    let thread = {
        let (placer, failed) = (Arc::clone(&ram), Arc::clone(&failed));
        let mut page = vec![LOCAL_BYTE; PAGE_SIZE];
        ram.start_fault_thread(move |f: Fault| {
            let fetched = match &conn {
                Some(c) => fetch(c, f.gpa, &mut page),
                None => Ok(()),
            };
            let placed = fetched.and_then(|()| {
                placer
                    .place(f.gpa, &page)
                    .map(drop)
                    .map_err(RoundTripError::Postcopy)
            });
            if let Err(e) = placed {
                if let Ok(mut slot) = failed.lock() {
                    slot.get_or_insert(e);
                }
                let _ = placer.unregister();
            }
        })
        .map_err(RoundTripError::Postcopy)?
    };
    let mut touch_ns = Vec::with_capacity(faults);
    let mut byte = [0u8; 1];
    for i in 0..faults as u64 {
        thread::sleep(BETWEEN_FAULTS);
        let start = clock::monotonic_ns();
        ram.ram()
            .read(i * PAGE, &mut byte)
            .map_err(RoundTripError::Memory)?;
        touch_ns.push(clock::monotonic_ns() - start);
        if !ram.is_registered() {
            break;
        }
        let placed = match source {
            PageSource::Local => LOCAL_BYTE,
            PageSource::LoopbackTcp => SERVED_BYTE,
        };
        if byte[0] != placed {
            let _ = thread.stop();
            return Err(RoundTripError::WrongPage(i * PAGE));
        }
    }
    let stopped = thread.stop().map_err(RoundTripError::Postcopy);
    if let Some(e) = failed.lock().ok().and_then(|mut slot| slot.take()) {
        return Err(e);
    }
    stopped?;
    if let Some(s) = server {
        s.finish()?;
    }
    let read_to_placed_ns = ram.stats().latencies_ns;
    if touch_ns.is_empty() || read_to_placed_ns.is_empty() {
        return Err(RoundTripError::NoFaults);
    }
    Ok(RoundTrip {
        touch_ns,
        read_to_placed_ns,
    })
}

/// Asks the page server for the page at `gpa`, into `page`.
fn fetch(conn: &Connection, gpa: u64, page: &mut [u8]) -> Result<(), RoundTripError> {
    conn.write_all(&gpa.to_be_bytes())
        .and_then(|()| conn.read_exact(page))
        .map_err(RoundTripError::Transport)
}

/// The loopback page server: answers each 8-byte request with one page,
/// until the client closes.
struct PageServer {
    uri: MigrationUri,
    thread: thread::JoinHandle<Result<(), TransportError>>,
}

impl PageServer {
    fn start() -> Result<PageServer, RoundTripError> {
        let listener = Listener::bind(&MigrationUri::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        })
        .map_err(RoundTripError::Transport)?;
        let uri = listener.local_uri().map_err(RoundTripError::Transport)?;
        let thread = thread::spawn(move || {
            let conn = listener.accept()?;
            let page = vec![SERVED_BYTE; PAGE_SIZE];
            let mut request = [0u8; 8];
            loop {
                match conn.read(&mut request[..1])? {
                    0 => return Ok(()),
                    _ => conn.read_exact(&mut request[1..])?,
                }
                conn.write_all(&page)?;
            }
        });
        Ok(PageServer { uri, thread })
    }

    fn finish(self) -> Result<(), RoundTripError> {
        match self.thread.join() {
            Ok(r) => r.map_err(RoundTripError::Transport),
            Err(_) => Err(RoundTripError::ServerPanicked),
        }
    }
}

/// The migration's configuration for the case: `config` with postcopy
/// (after the first pass) and `postcopy-preempt` on, the background pass
/// unlimited unless `given("max-postcopy-bandwidth")`, and the precopy
/// pass held to [`PRECOPY_PASS_SECONDS`] over `guest`'s working set
/// unless `given("max-bandwidth")`.
pub fn postcopy_config(
    config: &MigrationConfig,
    guest: BenchCase,
    given: impl Fn(&str) -> bool,
) -> MigrationConfig {
    let mut config = config.clone();
    config.capabilities |= Capabilities::POSTCOPY_RAM | Capabilities::POSTCOPY_PREEMPT;
    if !given("max-bandwidth") {
        config.parameters.max_bandwidth = (guest.dirty_mib << 20)
            .div_ceil(PRECOPY_PASS_SECONDS)
            .max(1);
    }
    demo::postcopy_config(&mut config, given);
    config
}

/// One round: the two baselines, then the migration.
#[derive(Debug, Clone)]
pub struct FaultRun {
    /// The bare userfaultfd round trip.
    pub uffd: RoundTrip,
    /// The round trip with a loopback TCP request for the page.
    pub tcp: RoundTrip,
    /// The migration as `livemig demo` reports it.
    pub summary: Summary,
}

impl FaultRun {
    /// The destination's fault latency samples (read → placed), ns: one
    /// per request it made.
    pub fn fault_ns(&self) -> Vec<u64> {
        self.summary
            .extra
            .get("postcopy-fault-latency")
            .and_then(|l| l.get("samples-ns"))
            .and_then(Value::as_array)
            .map(|v| v.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    }

    /// This round as one JSON object (its own percentiles).
    pub fn to_json(&self) -> Value {
        let trip = |t: &RoundTrip| {
            json!({
                "touch-to-resume": Latency::of_ns(t.touch_ns.clone()).map(latency_json),
                "read-to-placed": Latency::of_ns(t.read_to_placed_ns.clone()).map(latency_json),
            })
        };
        json!({
            "uffd-round-trip": trip(&self.uffd),
            "uffd-tcp-round-trip": trip(&self.tcp),
            "fault-latency": Latency::of_ns(self.fault_ns()).map(latency_json),
            "downtime": self.summary.downtime(),
            "downtime-breakdown": self.summary.extra.get("downtime-breakdown"),
            "status": self.summary.stats.status.as_str(),
            "verified": self.summary.verified,
            "error-desc": self.summary.error_desc(),
        })
    }
}

fn latency_json(l: Latency) -> Value {
    json!({
        "samples": l.samples,
        "median-us": l.median_us,
        "p90-us": l.p90_us,
        "p99-us": l.p99_us,
    })
}

/// The samples of every round pooled, each set's percentiles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pooled {
    /// The bare userfaultfd round trip, touch → resume: "the raw
    /// userfaultfd round trip" of the issue's target.
    pub uffd: Latency,
    /// The same faults, read → placed.
    pub uffd_placed: Latency,
    /// The round trip with a loopback TCP request, touch → resume.
    pub tcp: Latency,
    /// The same faults, read → placed.
    pub tcp_placed: Latency,
    /// The migrations' requests, read → placed (`None`: no request).
    pub fault: Option<Latency>,
}

impl Pooled {
    /// Pools `runs` (`None` when there are none).
    pub fn of(runs: &[FaultRun]) -> Option<Pooled> {
        let all = |f: &dyn Fn(&FaultRun) -> &[u64]| {
            Latency::of_ns(runs.iter().flat_map(|r| f(r).iter().copied()).collect())
        };
        Some(Pooled {
            uffd: all(&|r| &r.uffd.touch_ns)?,
            uffd_placed: all(&|r| &r.uffd.read_to_placed_ns)?,
            tcp: all(&|r| &r.tcp.touch_ns)?,
            tcp_placed: all(&|r| &r.tcp.read_to_placed_ns)?,
            fault: Latency::of_ns(runs.iter().flat_map(FaultRun::fault_ns).collect()),
        })
    }

    /// Median fault latency over the bare userfaultfd round trip's median
    /// (touch → resume): the target ratio (at most 1.5).
    pub fn vs_uffd(&self) -> Option<f64> {
        Some(self.fault?.median_us / self.uffd.median_us)
    }

    /// Median fault latency over the median round trip with one loopback
    /// TCP request (touch → resume).
    pub fn vs_tcp(&self) -> Option<f64> {
        Some(self.fault?.median_us / self.tcp.median_us)
    }

    /// The pooled figures as one JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "uffd-round-trip": latency_json(self.uffd),
            "uffd-read-to-placed": latency_json(self.uffd_placed),
            "uffd-tcp-round-trip": latency_json(self.tcp),
            "uffd-tcp-read-to-placed": latency_json(self.tcp_placed),
            "fault-latency": self.fault.map(latency_json),
            "vs-uffd": self.vs_uffd(),
            "vs-uffd-tcp": self.vs_tcp(),
        })
    }
}

/// `opts.runs` rounds of the case, each the two baselines then the
/// migration of `guest` under `config` (see [`postcopy_config`]).
pub fn run(
    guest: BenchCase,
    opts: &BenchOptions,
    config: &MigrationConfig,
    cancel: &Cancel,
) -> Result<Vec<FaultRun>, FaultBenchError> {
    if opts.runs == 0 {
        return Err(FaultBenchError::Bench(BenchError::NoRuns));
    }
    let mut runs = Vec::new();
    for round in 1..=opts.runs {
        let uffd = round_trip(PageSource::Local, ROUND_TRIPS)?;
        let tcp = round_trip(PageSource::LoopbackTcp, ROUND_TRIPS)?;
        let summary = demo::run_demo_with(
            shape(guest, opts),
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
            return Err(FaultBenchError::Bench(BenchError::Cancelled));
        }
        let run = FaultRun { uffd, tcp, summary };
        if opts.verbose {
            let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
            let median = |ns: Vec<u64>| Latency::of_ns(ns).map(|l| l.median_us);
            let fault = Latency::of_ns(run.fault_ns());
            eprintln!(
                "bench: postcopy round {round}/{}: uffd {} us, uffd+TCP {} us, {} requests: \
                 median {} us (p99 {}), downtime {} ms, verified {}",
                opts.runs,
                f(median(run.uffd.touch_ns.clone())),
                f(median(run.tcp.touch_ns.clone())),
                fault.map_or(0, |l| l.samples),
                f(fault.map(|l| l.median_us)),
                f(fault.map(|l| l.p99_us)),
                f(run.summary.downtime()),
                run.summary.verified
            );
        }
        runs.push(run);
    }
    Ok(runs)
}

/// The rounds of a migration of `guest` as a table: the percentiles of
/// every sample of all rounds, the ratios of the medians, and the
/// downtime's median, minimum and maximum over the rounds.
pub fn table(guest: BenchCase, runs: &[FaultRun]) -> String {
    let f2 = |v: f64| format!("{v:.2}");
    let mut rows = vec![
        [
            "latency (all rounds pooled)",
            "samples",
            "median us",
            "p90 us",
            "p99 us",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let pooled = Pooled::of(runs);
    let mut row = |name: &str, l: Option<Latency>| {
        let cell = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        rows.push(vec![
            name.to_string(),
            cell(l.map(|l| l.samples.to_string())),
            cell(l.map(|l| f2(l.median_us))),
            cell(l.map(|l| f2(l.p90_us))),
            cell(l.map(|l| f2(l.p99_us))),
        ]);
    };
    row("uffd round trip (touch->resume)", pooled.map(|p| p.uffd));
    row("  read->placed", pooled.map(|p| p.uffd_placed));
    row("uffd+TCP round trip", pooled.map(|p| p.tcp));
    row("  read->placed", pooled.map(|p| p.tcp_placed));
    row("fault latency (read->placed)", pooled.and_then(|p| p.fault));
    let mut out = columns(&rows);
    let ratio = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    let downtime = Spread::of(runs.iter().filter_map(|r| r.summary.downtime()));
    let verified = runs.iter().all(|r| r.summary.verified);
    out.push_str(&columns(&[
        vec![String::new(), String::new()],
        vec![
            "fault latency / uffd round trip (target <= 1.5)".into(),
            ratio(pooled.and_then(|p| p.vs_uffd())),
        ],
        vec![
            "fault latency / uffd+TCP round trip".into(),
            ratio(pooled.and_then(|p| p.vs_tcp())),
        ],
        vec![
            "downtime ms, median (min-max) (target < 5)".into(),
            downtime.map_or("-".into(), |d| {
                format!("{} ({}-{})", f2(d.median), f2(d.min), f2(d.max))
            }),
        ],
        vec!["verified".into(), verified.to_string()],
    ]));
    out.push_str(&format!(
        "\n{} rounds of: {ROUND_TRIPS} faults on fresh pages registered with livemig's \
         userfaultfd layer,\nresolved by its fault thread (uffd: the page at hand; uffd+TCP: \
         fetched first over\nloopback TCP from a server thread), timed on the faulting thread \
         from touch to resume;\nthen a postcopy migration of a {} MiB guest with a {} MiB \
         working set (first pass held to\n{PRECOPY_PASS_SECONDS} s over the working set, switch \
         after it, postcopy-preempt on, background pass\nunlimited). fault latency: per \
         request, fault event read -> page placed on the\ndestination; the baselines' read->placed rows\ntime the same span. The ratios are of \
         the medians, against touch->resume: the\nfault's own span starts later, at the read, \
         but the books' clock also ends later, after\nthe wake (read->placed can exceed \
         touch->resume), so compare the read->placed rows too.\n",
        runs.len(),
        guest.mem_mib,
        guest.dirty_mib,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_takes_nearest_rank_percentiles_in_microseconds() {
        let l = Latency::of_ns((1..=100).rev().map(|i| i * 1000).collect()).unwrap();
        assert_eq!(
            (l.samples, l.median_us, l.p90_us, l.p99_us),
            (100, 50.0, 90.0, 99.0)
        );
        assert_eq!(Latency::of_ns(Vec::new()), None);
    }

    /// Both baselines serve every fault with the page they were given
    /// (the toucher checks each byte), and the TCP one costs at least the
    /// span its own fault thread measured.
    #[test]
    fn both_round_trips_place_every_page_they_time() {
        for source in [PageSource::Local, PageSource::LoopbackTcp] {
            let t = match round_trip(source, 50) {
                Err(RoundTripError::Postcopy(PostcopyError::Create(why))) => {
                    assert!(
                        std::env::var_os("LIVEMIG_REQUIRE_KVM").is_none(),
                        "no userfaultfd: {why}"
                    );
                    eprintln!("SKIPPED: no full userfaultfd here: {why}");
                    return;
                }
                r => r.unwrap(),
            };
            let touch = Latency::of_ns(t.touch_ns).unwrap();
            let placed = Latency::of_ns(t.read_to_placed_ns).unwrap();
            assert_eq!((touch.samples, placed.samples), (50, 50));
            assert!(touch.median_us > 0.0 && touch.p99_us >= touch.median_us);
            assert!(placed.median_us > 0.0);
        }
        assert!(matches!(
            round_trip(PageSource::Local, 0),
            Err(RoundTripError::NoFaults)
        ));
    }
}
