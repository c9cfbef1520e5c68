//! `livemig bench --case postcopy`: postcopy's fault latency against the
//! userfaultfd round trip measured in the same run, and postcopy's
//! downtime.
//!
//! A fault latency on its own says little (it moves with the machine's
//! load), so each round measures, back to back:
//!
//! 1. the **userfaultfd round trip**: a thread touches a missing page of
//!    memory registered with livemig's own userfaultfd layer
//!    ([`PostcopyRam`] and its [`FaultThread`]: `poll`, read the event,
//!    `UFFDIO_COPY`, wake), and the fault thread places the page itself;
//!    the toucher's time from the touch to its resume. What a fault costs
//!    with no migration behind it: the floor.
//! 2. the same **over loopback TCP**: the fault thread asks a server
//!    thread for the page (an 8-byte request, a 4 KiB answer, over the
//!    transport's [`Connection`], so `TCP_NODELAY` and buffer sizes are
//!    the migration's) before placing it: the floor for a fault that must
//!    cross one network round trip, as every postcopy request does.
//! 3. a **postcopy migration** of a busy 1 GiB guest as `livemig demo
//!    --mode postcopy` does it (the switch after the first precopy pass),
//!    with `postcopy-preempt` on and the background pass unlimited; the
//!    destination's fault latency is per request, from the fault event
//!    read by its fault thread to the page placed.
//!
//! The migration's span starts later than the baselines' (at the fault
//! thread's read, not at the touch: the kernel's delivery and the fault
//! thread's wake-up are outside it), so its ratio to them is a lower bound
//! of the true ratio; the baselines report the same span (read → placed)
//! beside their touch → resume, to show how much that start leaves out.

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

/// Median and 99th percentile of a set of latencies, microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// The median.
    pub median_us: f64,
    /// The 99th percentile (nearest rank).
    pub p99_us: f64,
}

impl Latency {
    /// The latency of `ns` samples (`None` when there are none).
    pub fn of_ns(mut ns: Vec<u64>) -> Option<Latency> {
        ns.sort_unstable();
        let us = |v: u64| v as f64 / 1000.0;
        Some(Latency {
            median_us: us(nearest_rank(&ns, 50)?),
            p99_us: us(nearest_rank(&ns, 99)?),
        })
    }
}

/// One baseline: what the toucher saw, and the fault thread's own span.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundTrip {
    /// Touch → resume, on the faulting thread.
    pub touch: Latency,
    /// Fault event read → page placed, from the userfaultfd layer's books
    /// (the span the migration's fault latency covers).
    pub read_to_placed: Latency,
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
    let stats = ram.stats();
    let read_to_placed = stats
        .latency_median_us
        .zip(stats.latency_p99_us)
        .map(|(median_us, p99_us)| Latency { median_us, p99_us });
    match (Latency::of_ns(touch_ns), read_to_placed) {
        (Some(touch), Some(read_to_placed)) => Ok(RoundTrip {
            touch,
            read_to_placed,
        }),
        _ => Err(RoundTripError::NoFaults),
    }
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
/// (after the first pass) and `postcopy-preempt` on, and the background
/// pass unlimited unless `given("max-postcopy-bandwidth")`.
pub fn postcopy_config(config: &MigrationConfig, given: impl Fn(&str) -> bool) -> MigrationConfig {
    let mut config = config.clone();
    config.capabilities |= Capabilities::POSTCOPY_RAM | Capabilities::POSTCOPY_PREEMPT;
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
    /// The destination's fault latency (read → placed), if it had faults.
    pub fn fault_latency(&self) -> Option<Latency> {
        let l = self.summary.extra.get("postcopy-fault-latency")?;
        Some(Latency {
            median_us: l.get("median-us")?.as_f64()?,
            p99_us: l.get("p99-us")?.as_f64()?,
        })
    }

    /// Page requests the destination's faults made.
    pub fn samples(&self) -> Option<u64> {
        self.summary
            .extra
            .get("postcopy-fault-latency")?
            .get("samples")?
            .as_u64()
    }

    /// Median fault latency over the bare userfaultfd round trip: the
    /// issue's target ratio (at most 1.5).
    pub fn vs_uffd(&self) -> Option<f64> {
        Some(self.fault_latency()?.median_us / self.uffd.touch.median_us)
    }

    /// Median fault latency over the round trip with one TCP request.
    pub fn vs_tcp(&self) -> Option<f64> {
        Some(self.fault_latency()?.median_us / self.tcp.touch.median_us)
    }

    /// This round as one JSON object.
    pub fn to_json(&self) -> Value {
        let lat = |l: Latency| json!({ "median-us": l.median_us, "p99-us": l.p99_us });
        let trip = |t: RoundTrip| json!({ "touch-to-resume": lat(t.touch), "read-to-placed": lat(t.read_to_placed) });
        json!({
            "uffd-round-trip": trip(self.uffd),
            "uffd-tcp-round-trip": trip(self.tcp),
            "fault-latency": self.fault_latency().map(lat),
            "fault-samples": self.samples(),
            "vs-uffd": self.vs_uffd(),
            "vs-uffd-tcp": self.vs_tcp(),
            "downtime": self.summary.downtime(),
            "status": self.summary.stats.status.as_str(),
            "verified": self.summary.verified,
            "error-desc": self.summary.error_desc(),
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
            eprintln!(
                "bench: postcopy round {round}/{}: uffd {:.1} us, uffd+TCP {:.1} us, fault \
                 latency median {} us (p99 {}), {}x uffd, downtime {} ms, verified {}",
                opts.runs,
                run.uffd.touch.median_us,
                run.tcp.touch.median_us,
                f(run.fault_latency().map(|l| l.median_us)),
                f(run.fault_latency().map(|l| l.p99_us)),
                run.vs_uffd().map_or("-".into(), |r| format!("{r:.2}")),
                f(run.summary.downtime()),
                run.summary.verified
            );
        }
        runs.push(run);
    }
    Ok(runs)
}

/// The rounds of a migration of `guest` as a table: median, minimum and
/// maximum of each figure.
pub fn table(guest: BenchCase, runs: &[FaultRun]) -> String {
    type Figure = (&'static str, fn(&FaultRun) -> Option<f64>);
    let figures: [Figure; 12] = [
        ("uffd round trip us", |r| Some(r.uffd.touch.median_us)),
        ("  p99 us", |r| Some(r.uffd.touch.p99_us)),
        ("  read->placed us", |r| {
            Some(r.uffd.read_to_placed.median_us)
        }),
        ("uffd+TCP round trip us", |r| Some(r.tcp.touch.median_us)),
        ("  p99 us", |r| Some(r.tcp.touch.p99_us)),
        ("  read->placed us", |r| {
            Some(r.tcp.read_to_placed.median_us)
        }),
        ("fault latency us", |r| {
            r.fault_latency().map(|l| l.median_us)
        }),
        ("  p99 us", |r| r.fault_latency().map(|l| l.p99_us)),
        ("  requests", |r| r.samples().map(|n| n as f64)),
        ("vs uffd x (target <= 1.5)", FaultRun::vs_uffd),
        ("vs uffd+TCP x", FaultRun::vs_tcp),
        ("downtime ms (target < 5)", |r| r.summary.downtime()),
    ];
    let fmt = |v: f64| format!("{v:.2}");
    let mut rows = vec![
        ["figure", "median", "min", "max"]
            .map(String::from)
            .to_vec(),
    ];
    for (name, f) in figures {
        let s = Spread::of(runs.iter().filter_map(f));
        rows.push(vec![
            name.to_string(),
            s.map_or("-".into(), |s| fmt(s.median)),
            s.map_or("-".into(), |s| fmt(s.min)),
            s.map_or("-".into(), |s| fmt(s.max)),
        ]);
    }
    let verified = runs.iter().all(|r| r.summary.verified);
    rows.push(vec![
        "verified".into(),
        verified.to_string(),
        String::new(),
        String::new(),
    ]);
    let mut out = columns(&rows);
    out.push_str(&format!(
        "\n{} rounds of: {ROUND_TRIPS} faults on fresh pages registered with livemig's \
         userfaultfd layer,\nresolved by its fault thread (uffd: the page at hand; uffd+TCP: \
         fetched first over\nloopback TCP from a server thread), timed on the faulting thread \
         from touch to resume;\nthen a postcopy migration of a {} MiB guest with a {} MiB \
         working set (switch after the\nfirst pass, postcopy-preempt on, background pass \
         unlimited). fault latency: per request,\nfault event read -> page placed on the \
         destination (later start than the baselines':\nthe ratios are lower bounds); the \
         ratios use the median of each round, same round.\n",
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
        let l = Latency::of_ns((1..=100).map(|i| i * 1000).collect()).unwrap();
        assert_eq!((l.median_us, l.p99_us), (50.0, 99.0));
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
            assert!(t.touch.median_us > 0.0 && t.touch.p99_us >= t.touch.median_us);
            assert!(t.read_to_placed.median_us > 0.0);
        }
        assert!(matches!(
            round_trip(PageSource::Local, 0),
            Err(RoundTripError::NoFaults)
        ));
    }
}
