//! `livemig`: live-migrate the demo KVM guest, between two processes of one
//! machine (`demo`) or two machines (`receive` on one, `send` on the
//! other).
//!
//! Errors are one line on stderr and a non-zero exit status; the summary
//! goes to stdout, as text or (`--json`) as one JSON object with QEMU's
//! `query-migrate` field names.

use std::num::NonZeroU16;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use livemig_cli::bench::{self, BenchCase, BenchError, BenchOptions};
use livemig_cli::demo::{self, DemoError, GuestShape};
use livemig_cli::events::EventLog;
use livemig_cli::fault_bench;
use livemig_cli::guest;
use livemig_cli::interrupt::{self, Cancel, Decision, Hold};
use livemig_cli::options;
use livemig_cli::report::{Progress, Summary};
use livemig_cli::timeline;
use livemig_cli::touch_bench;
use livemig_cli::{qemu, run, verify_cost, vmm, vs_qemu};
use livemig_core::capabilities::Capabilities;
use livemig_core::config::{MigrationConfig, SwitchoverPolicy};
use livemig_core::status::MigrationStatus;
use livemig_kvm::dirty_log::DirtyLogMode;
use livemig_kvm::migrate::recovery::DEFAULT_RECOVER_TIMEOUT;
use livemig_kvm::migrate::source::{DEFAULT_SLICE_MS, DEFAULT_STOP_COST, SourceOptions};
use livemig_kvm::priority::StopPriority;
use livemig_kvm::transport::MigrationUri;
use livemig_kvm::{ReceiveOptions, Recovery};
use serde_json::json;

#[derive(Parser)]
#[command(name = "livemig", version, about = "Live migration of a KVM guest")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a destination process, boot the demo guest here (in the demo
    /// VMM, on --vcpus vCPUs), migrate it
    /// over TCP on 127.0.0.1, let it run on the destination, verify it and
    /// print the summary. Without /dev/kvm the same migration runs on the
    /// simulated backend. max-bandwidth defaults to 0 (unlimited) here,
    /// unlike QEMU's 128 MiB/s, unless --param max-bandwidth= is given.
    ///
    /// Verification: after a precopy, the destination's memory must equal
    /// the source's at the stop. After a postcopy the destination guest ran
    /// during the migration, so the destination logs its guest's writes
    /// (KVM's dirty log, from before the stream), pauses it after --run-ms
    /// and digests every page it did not write; the source (stopped since
    /// the switchover) digests the same pages of its stop image, and the
    /// two must be equal.
    /// Either way the guest's own stamp checks must report no mismatch,
    /// every vCPU must have stamped pages past where it stood at the stop
    /// (its stamp counter in memory; no whole generation is needed), each
    /// page of the working set holding the stamp those counters imply, the
    /// timer must have ticked on and the serial lines of both hosts must
    /// form one sequence: the summary's `guest` object.
    Demo(DemoArgs),
    /// Boot the demo guest and migrate it to a `livemig receive` at --to.
    /// The migration verifies itself: `verified` is true once the receiver
    /// compared this side's digest with what it loaded and found them
    /// equal (`verification` says where the check stands, see --no-verify).
    /// Its `digest` (of its stopped memory) equals the receiver's when that
    /// one takes one (`receive --digest`). After
    /// a postcopy its `downtime` runs from its vCPU stop to the receiver's
    /// answer to the ping after the switchover package (`downtime-span`).
    ///
    /// If the end is ambiguous (the destination vanished after this side's
    /// COMMIT), the paused guest is held until the operator decides:
    /// SIGUSR1 resumes it here (exit status 0 when it runs on), SIGTERM,
    /// SIGINT or --hold-timeout-s discard it (exit status 3). Other
    /// failures exit with 1.
    Send(SendArgs),
    /// Wait at --listen for one migration, load it into a fresh VM, start
    /// the guest and report. Prints `listening on URI` first, and `a
    /// migration arrived from PEER` on stderr when one does (until then
    /// Ctrl-C simply ends it; from then on it interrupts the migration,
    /// and the source keeps its guest). `verified`
    /// is true when the sender's digest, compared here before the guest
    /// started, equals what was loaded (a mismatch refuses to start the
    /// guest, and the sender keeps it); --digest adds a digest of the
    /// loaded memory to compare with the sender's by hand.
    /// A postcopy migration is taken as the source sends it (the guest
    /// starts at the switchover); the report then adds the fault latency
    /// and the pages the guest wrote here (`guest-written-ranges`); its
    /// `digest` is still that of the source's memory at the stop (pages the
    /// guest wrote count as they were installed).
    ///
    /// If the end is ambiguous (loaded, then no COMMIT), the loaded guest
    /// is held paused until the operator decides: SIGUSR1 starts it here
    /// and reports it as after a completed migration (exit status 0 when it
    /// runs on), SIGTERM, SIGINT or --hold-timeout-s discard it (exit
    /// status 3). Other failures exit with 1.
    Receive(ReceiveArgs),
    /// Time `demo` migrations of an idle 4 GiB guest and of a 1 GiB guest
    /// with a 64 MiB working set, each against a raw TCP copy of the same
    /// bytes over 127.0.0.1 measured in the same run; print median, min and
    /// max of each figure and the ratios. Fails if any migration does not
    /// verify. Needs /dev/kvm. With --vs-qemu, QEMU migrates the same guest
    /// too, alternating with livemig's runs.
    Bench(BenchArgs),
    /// Boot the demo guest in the demo VMM (rust-vmm crates: its own KVM
    /// VM, in-kernel irqchip and PIT, a 16550 on COM1) on --vcpus vCPUs,
    /// without migrating it: run it for --run-ms, pause it and report what
    /// each vCPU stamped, the timer ticks and the serial lines it wrote.
    /// Exits with 1 unless every vCPU made progress without a mismatch and
    /// the ticks and serial lines came. Needs /dev/kvm.
    Run(RunArgs),
    /// The receiving end of `bench`'s raw TCP copy: listen, print
    /// `listening on URI`, read one length-prefixed copy, acknowledge it.
    #[command(hide = true)]
    BenchSink(BenchSinkArgs),
}

#[derive(Args)]
struct Migration {
    /// Migration mode: precopy, or postcopy (switch to postcopy after the
    /// first precopy pass: sets postcopy-ram, and downtime-limit=0 unless
    /// --param downtime-limit= is given, so that precopy does not complete
    /// first).
    #[arg(long, default_value = "precopy")]
    mode: String,
    /// With --cap pause-before-switchover=on: how long the stopped guest
    /// waits in pre-switchover before the switchover continues by itself
    /// (there is no separate continue command), in ms.
    #[arg(long, default_value_t = 0)]
    switchover_pause_ms: u64,
    /// Fail the migration when the socket accepts no byte for this long (the
    /// destination stopped reading, or the link is down), counted from the
    /// last byte accepted, in ms; on TCP also the kernel's
    /// TCP_USER_TIMEOUT. 0 waits forever. The guest then runs on at the
    /// source.
    #[arg(long, default_value_t = 30_000)]
    send_timeout_ms: u64,
    /// Do not verify the migration: no page is hashed, no digest is sent,
    /// and `verified` (for `send`) stays false.
    #[arg(long)]
    no_verify: bool,
    /// Also audit the source's memory at the stop: every page is hashed
    /// again with the vCPUs stopped and compared with what was sent, which
    /// catches a dirty log that missed a write, at the cost of a hash of
    /// all RAM inside the downtime.
    #[arg(long, conflicts_with = "no_verify")]
    audit: bool,
    /// A capability, in QEMU's names: --cap postcopy-ram=on (repeatable).
    /// return-path and zero-page-detection are on by default. With --mode
    /// postcopy, postcopy-blocktime=on also reports the time each vCPU spent
    /// blocked on missing pages.
    #[arg(long = "cap", value_name = "NAME=on|off")]
    caps: Vec<String>,
    /// A parameter, in QEMU's names: --param downtime-limit=100
    /// (repeatable; byte counts take k/M/G suffixes).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// When precopy stops the guest, among the stops that fit
    /// downtime-limit: shortest-stop iterates while passes shrink the stop
    /// and takes the shortest the dirty rate allows; fits-limit is QEMU's
    /// rule, the first stop that fits.
    #[arg(long, default_value = "shortest-stop", value_parser = ["shortest-stop", "fits-limit"])]
    switchover_policy: String,
    /// With shortest-stop: never throttle the guest to shorten the stop
    /// (by default, when passes stop shrinking a stop that still has a
    /// millisecond or more of pages to send, the guest's vCPUs are held
    /// back, from 50 % up to max-cpu-throttle, until the final set
    /// shrinks; the report says for how long and how hard).
    #[arg(long)]
    no_stop_throttle: bool,
    /// Leave the migration's threads at their usual priority during the
    /// stop (by default the migration thread and the return-path reader
    /// run real-time, SCHED_FIFO 1, or at nice -10 where that is refused,
    /// from the vCPU stop until the guest runs again, and the vCPU threads
    /// until they are parked, so that their wake-ups in the stop do not
    /// wait behind other threads; a refusal is in the summary's
    /// `stop-priority-refused`). `demo` passes it to its destination.
    #[arg(long)]
    no_stop_priority: bool,
}

#[derive(Args)]
struct Output {
    /// Print the summary as one JSON object (query-migrate field names);
    /// events come before it, one JSON object a line (`migration-arrived`
    /// on `receive`, a postcopy pause and recovery, `held` after an
    /// ambiguous end).
    #[arg(long)]
    json: bool,
    /// No progress line, even on a terminal.
    #[arg(long)]
    quiet: bool,
}

/// The source guest's workload and warm-up, the same for `demo` and `send`
/// (their --mem-mib differ only in help text, so each keeps its own).
#[derive(Args)]
struct Workload {
    /// vCPUs of the demo VMM (1 to 8, default 2), sharing the working set.
    /// Needs KVM: the simulated fallback of `demo` has no vCPUs and
    /// refuses it.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(guest::MAX_VCPUS)))]
    vcpus: Option<u32>,
    /// Working set the guest keeps rewriting, in MiB (0 = idle guest).
    #[arg(long, default_value_t = 64)]
    dirty_mib: u64,
    /// How long the guest runs before the migration starts, in ms.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
    /// Dirty-log mode: manual-protect (falls back by itself when KVM lacks
    /// it) or get-and-clear (forces the fallback).
    #[arg(long, default_value = "manual-protect", value_parser = ["manual-protect", "get-and-clear"])]
    dirty_log: String,
}

impl Workload {
    /// The guest to boot on the source, with `mem_mib` of RAM.
    fn shape(&self, mem_mib: u64) -> Result<GuestShape, String> {
        Ok(GuestShape {
            mem_mib,
            dirty_mib: self.dirty_mib,
            dirty_log: dirty_log(&self.dirty_log)?,
            vcpus: self.vcpus.unwrap_or(vmm::DEFAULT_VCPUS),
            fill: false,
        })
    }

    /// How long the guest runs on the source before the migration starts.
    fn warmup(&self) -> Duration {
        Duration::from_millis(self.warmup_ms)
    }
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    migration: Migration,
    #[command(flatten)]
    output: Output,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    mem_mib: u64,
    #[command(flatten)]
    workload: Workload,
    /// How long the guest runs on the destination before the verdict, in ms.
    #[arg(long, default_value_t = 1000)]
    run_ms: u64,
    /// Give up on a precopy that has not converged after this many seconds
    /// (the guest keeps running on the source); 0 = never.
    #[arg(long, default_value_t = 30)]
    time_limit_s: u64,
    /// With --mode postcopy: shut the connection down this many ms after
    /// the switchover, as a cut link would; the migration pauses, recovers
    /// over a new connection, and the summary counts it in
    /// `postcopy-recoveries`. Unless --param max-postcopy-bandwidth= is
    /// given, the background pass is held to 4 MiB/s so that the postcopy
    /// still runs at the cut.
    #[arg(long, value_name = "MS")]
    cut_after_ms: Option<u64>,
    /// Have the destination preallocate its RAM at start-up (`receive
    /// --mem-prealloc`), before the migration starts. Precopy only.
    #[arg(long)]
    mem_prealloc: bool,
    #[command(flatten)]
    timeline: TimelineArgs,
}

#[derive(Args)]
struct SendArgs {
    /// Where the destination listens: tcp:HOST:PORT, unix:PATH or fd:N.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    migration: Migration,
    #[command(flatten)]
    output: Output,
    /// Guest RAM in MiB (must equal the destination's).
    #[arg(long, default_value_t = 1024)]
    mem_mib: u64,
    #[command(flatten)]
    workload: Workload,
    /// Give up on a precopy that has not converged after this many seconds
    /// (the guest keeps running on the source); 0 = never. Precopy also
    /// gives up after 10 passes in a row that did not shrink what is left
    /// to send.
    #[arg(long, default_value_t = 300)]
    time_limit_s: u64,
    /// After the postcopy switchover a cut connection pauses the migration
    /// (the guest runs on the destination, the pages it has not received
    /// are only here): connect again to this address (default: --to),
    /// retrying until --recover-timeout-s.
    #[arg(long, value_name = "URI")]
    resume_to: Option<String>,
    /// How long a paused postcopy keeps trying to recover, in seconds, from
    /// the pause; after that it fails, saying where the guest's pages are.
    #[arg(long, default_value_t = DEFAULT_RECOVER_TIMEOUT.as_secs())]
    recover_timeout_s: u64,
    /// After an ambiguous end (the commit handshake was cut) the guest is
    /// held paused until the operator decides: SIGUSR1 runs it here,
    /// SIGTERM or SIGINT discards it, and so does this many seconds
    /// without a decision.
    #[arg(long, default_value_t = 3600)]
    hold_timeout_s: u64,
    #[command(flatten)]
    timeline: TimelineArgs,
}

#[derive(Args)]
struct ReceiveArgs {
    /// Where to listen: tcp:HOST:PORT (port 0 picks one), unix:PATH or fd:N.
    #[arg(long)]
    listen: String,
    #[command(flatten)]
    output: Output,
    /// Guest RAM in MiB (must equal the source's).
    #[arg(long, default_value_t = 1024)]
    mem_mib: u64,
    /// vCPUs of the demo VMM (1 to 8; must equal the source's).
    #[arg(long, default_value_t = vmm::DEFAULT_VCPUS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(guest::MAX_VCPUS)))]
    vcpus: u32,
    /// How long the guest runs after the switchover before the report, in ms.
    #[arg(long, default_value_t = 1000)]
    run_ms: u64,
    /// Give up on a source that sends nothing for this long, in ms (a source
    /// that vanished without closing the connection must not leave the
    /// destination waiting forever).
    #[arg(long, default_value_t = 30_000)]
    idle_timeout_ms: u64,
    /// Leave the migration's threads at their usual priority in the stop
    /// (by default the migration thread and the stream's reader run
    /// real-time, SCHED_FIFO 1, or at nice -10 where that is refused, from
    /// the first vCPU state received until the guest starts here, so that
    /// their wake-ups in the stop do not wait behind other threads; a
    /// refusal is in the summary's `stop-priority-refused-errno`).
    #[arg(long)]
    no_stop_priority: bool,
    /// Also digest the loaded memory before the guest starts (a second
    /// opinion to compare with the sender's `digest`; it lengthens the
    /// downtime by `digest-time`).
    #[arg(long)]
    digest: bool,
    /// After a precopy too, report the pages the guest wrote here
    /// (`guest-written-ranges`) and the digest of all the others, taken at
    /// the end of the watch with the guest paused (`digest-unwritten`, as
    /// after a postcopy): a second opinion from outside the stop. The
    /// guest's writes are logged meanwhile, which slows its first write
    /// of each page here.
    #[arg(long)]
    digest_unwritten: bool,
    /// Preallocate all of guest RAM at start-up, before the listening
    /// address is announced (QEMU's -mem-prealloc): the pages a precopy
    /// sends land in memory already allocated, at the price of all RAM
    /// resident from the start. The time is in the summary's
    /// `mem-prealloc-ms`, outside the migration's. A source that advises
    /// postcopy is refused (userfaultfd needs pages still missing).
    #[arg(long)]
    mem_prealloc: bool,
    /// A destination capability: --cap postcopy-blocktime=on reports the
    /// time each vCPU spent blocked on missing pages after a postcopy
    /// (repeatable). It is the only one: postcopy itself needs no flag
    /// here, and the source's capabilities (multifd, postcopy-preempt, ...)
    /// come with its stream, so they are refused here.
    #[arg(long = "cap", value_name = "NAME=on|off")]
    caps: Vec<String>,
    /// After the postcopy switchover a cut connection pauses the migration
    /// (the guest runs on here, waiting on pages still at the source):
    /// listen for the source's new connection at this address (default:
    /// keep listening at --listen).
    #[arg(long, value_name = "URI")]
    recover_listen: Option<String>,
    /// How long a paused postcopy waits for the source to come back, in
    /// seconds, from the pause; after that it fails, saying where the
    /// guest's pages are.
    #[arg(long, default_value_t = DEFAULT_RECOVER_TIMEOUT.as_secs())]
    recover_timeout_s: u64,
    /// After an ambiguous end (the commit handshake was cut) the guest is
    /// held paused until the operator decides: SIGUSR1 runs it here,
    /// SIGTERM or SIGINT discards it, and so does this many seconds
    /// without a decision.
    #[arg(long, default_value_t = 3600)]
    hold_timeout_s: u64,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    migration: Migration,
    /// Print one JSON object per case (median, min, max of each figure and
    /// every run) instead of the table.
    #[arg(long)]
    json: bool,
    /// No per-run lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// A case to run (repeatable; default: idle-4g and busy-1g): idle-4g,
    /// busy-1g, or multifd alone (a 1 GiB guest of non-zero pages over 1,
    /// 2 and N channels, N from --param multifd-channels or 4, each into a
    /// fresh destination and into one that preallocated its RAM at
    /// start-up, against as many raw TCP streams), or postcopy alone (the userfaultfd round trip,
    /// bare and over loopback TCP, then a postcopy migration with
    /// postcopy-preempt of a 1 GiB guest with a 64 MiB working set, its
    /// first pass held to 2 s unless --param max-bandwidth= is given:
    /// fault latency of all rounds' requests pooled, the ratios and the
    /// downtime), or first-touch alone (no
    /// migration: the cost of a page's first write into fresh memory, by
    /// memcpy and by a loopback socket read, plain, with MADV_HUGEPAGE,
    /// MAP_POPULATE and MADV_POPULATE_WRITE, against a reused buffer;
    /// --mem-mib-override sets the MiB per measurement, default 256).
    #[arg(long = "case", value_parser = ["idle-4g", "busy-1g", "multifd", "postcopy", "first-touch"])]
    cases: Vec<String>,
    /// Runs per case; the figures are median, min and max over them.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Give every case this much RAM instead (working set scaled in
    /// proportion): for quick checks, not for published numbers.
    #[arg(long)]
    mem_mib_override: Option<u64>,
    /// How long the guest runs before each migration, in ms.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
    /// How long the guest runs on the destination before the verdict, in ms.
    #[arg(long, default_value_t = 500)]
    run_ms: u64,
    /// vCPUs of the demo VMM (1 to 8).
    #[arg(long, default_value_t = vmm::DEFAULT_VCPUS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(guest::MAX_VCPUS)))]
    vcpus: u32,
    /// After each livemig run, boot the same guest under qemu-system-x86_64
    /// (KVM) and migrate it with QEMU over loopback TCP with the same RAM,
    /// working set, vCPUs, warmup, downtime limit and bandwidth; print
    /// QEMU's figures and the ratios livemig / QEMU. Without QEMU on PATH
    /// this part is skipped (one line on stderr); a QEMU that fails is an
    /// error.
    #[arg(long)]
    vs_qemu: bool,
    /// Run each case with verification on and off, alternating which goes
    /// first, --runs times each way, and print each figure's median both
    /// ways and the ratio on/off (downtime, final pages, total time,
    /// throughput). The unverified runs are checked by a digest of the
    /// pages the destination guest did not write, after its watch.
    #[arg(long, conflicts_with_all = ["vs_qemu", "no_verify", "timeline"])]
    verify_cost: bool,
    #[command(flatten)]
    timeline: TimelineArgs,
}

/// `--timeline` and its slice width, for `demo`, `send` and `bench`.
#[derive(Args)]
struct TimelineArgs {
    /// Draw the migration per slice (throughput, dirty rate, remaining
    /// bytes, switchover threshold, each dirty-log sync, the throttle and
    /// the stop) into this SVG file. Needs KVM. `bench` draws the run of
    /// median downtime of each case; with several cases, one file per
    /// case, named FILE-CASE.svg.
    #[arg(long, value_name = "FILE.svg")]
    timeline: Option<PathBuf>,
    /// Width of the timeline's slices, in ms (1 to 65535): finer than the
    /// default shows the passes of a migration of a fraction of a second.
    /// The source keeps the latest 6000 slices.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_SLICE_MS, requires = "timeline")]
    timeline_slice_ms: NonZeroU16,
}

#[derive(Args)]
struct BenchSinkArgs {
    /// Where to listen: tcp:HOST:PORT (port 0 picks one) or unix:PATH.
    #[arg(long)]
    listen: String,
    /// Where the bytes land: reused (one buffer, the socket's own speed)
    /// or fresh (memory never touched before, as a destination's RAM).
    #[arg(long, value_enum, default_value = "reused")]
    memory: bench::SinkMemory,
}

#[derive(Args)]
struct RunArgs {
    /// vCPUs (1 to 8).
    #[arg(long, default_value_t = vmm::DEFAULT_VCPUS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(guest::MAX_VCPUS)))]
    vcpus: u32,
    /// Guest RAM in MiB (4 to 16384; beyond 3072 it continues at 4 GiB).
    #[arg(long, default_value_t = 64)]
    mem_mib: u64,
    /// Working set the vCPUs share, in MiB at 2 MiB (0 = idle guest).
    #[arg(long, default_value_t = 4)]
    dirty_mib: u64,
    /// How long the guest runs, in ms.
    #[arg(long, default_value_t = 1000)]
    run_ms: u64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

fn config(m: &Migration, unlimited_by_default: bool) -> Result<MigrationConfig, String> {
    demo::check_mode(&m.mode).map_err(|e| e.to_string())?;
    let postcopy = m.mode == "postcopy";
    let mut params = Vec::new();
    if unlimited_by_default && !options::sets_param(&m.params, "max-bandwidth") {
        params.push("max-bandwidth=0".to_string());
    }
    params.extend(m.params.iter().cloned());
    // Postcopy first, so that capabilities needing it (postcopy-blocktime)
    // are accepted.
    let caps: Vec<String> = postcopy
        .then(|| "postcopy-ram=on".to_string())
        .into_iter()
        .chain(m.caps.iter().cloned())
        .collect();
    let mut config =
        options::build_config(demo::base_config(), &caps, &params).map_err(|e| e.to_string())?;
    config.switchover = SwitchoverPolicy::from_name(&m.switchover_policy)
        .ok_or_else(|| format!("unknown switchover policy '{}'", m.switchover_policy))?;
    config.stop_throttle = !m.no_stop_throttle;
    if postcopy {
        demo::postcopy_config(&mut config, |name| options::sets_param(&m.params, name));
    }
    Ok(config)
}

/// Rate at which `receive` digests the memory it loaded, measured on the
/// development VM (1.9 to 4.8 GB/s over 64 and 256 MiB working sets).
const DIGEST_BYTES_PER_SEC: u64 = 2 << 30;

fn source_options(m: &Migration, workload: &Workload, receiver_digests: bool) -> SourceOptions {
    // `demo`'s destination digests the memory it loaded before it starts
    // the guest (its second opinion, besides the migration's own check), so
    // that is part of its stop: about the working set at the digest rate.
    // A `receive` does so only when asked (`--digest`), which `send`
    // cannot know: it counts none.
    let digest = if receiver_digests {
        Duration::from_nanos(
            (workload.dirty_mib << 20).saturating_mul(1_000_000_000) / DIGEST_BYTES_PER_SEC,
        )
    } else {
        Duration::ZERO
    };
    SourceOptions {
        switchover_pause: Duration::from_millis(m.switchover_pause_ms),
        write_timeout: (m.send_timeout_ms > 0).then(|| Duration::from_millis(m.send_timeout_ms)),
        on_switchover: Some(announce_switchover),
        stop_cost: DEFAULT_STOP_COST + digest,
        verify: !m.no_verify,
        audit: m.audit,
        stop_priority: stop_priority(m),
        ..SourceOptions::default()
    }
}

/// The priority of the migration's threads during the stop.
fn stop_priority(m: &Migration) -> Option<StopPriority> {
    (!m.no_stop_priority).then_some(StopPriority::Realtime)
}

/// The moment the guest changes hands in postcopy, on stderr (also with
/// --quiet: an operator, or a script, needs to know that from now on a
/// Ctrl-C no longer cancels).
fn announce_switchover() {
    eprintln!("{SWITCHOVER_LINE}");
}

/// `demo --cut-after-ms`'s background pass without
/// `--param max-postcopy-bandwidth=`: 4 MiB/s, so that the cut finds the
/// postcopy running. The early discards leave only the pages dirtied
/// since the last precopy sync to the background pass, about 10 MB of the
/// default 64 MiB working set: at 32 MiB/s that was done 0.3 s after the
/// switchover, and a cut at 200 ms missed it one run in four.
const CUT_POSTCOPY_BANDWIDTH: u64 = 4 << 20;

/// What [`announce_switchover`] prints.
const SWITCHOVER_LINE: &str = "postcopy switchover: the guest now runs on the destination; \
     Ctrl-C and SIGTERM no longer cancel the migration";

/// Whether `receive`'s `--cap` flags turn postcopy-blocktime on.
fn receive_blocktime(caps: &[String]) -> Result<bool, String> {
    let on = options::destination_capabilities(caps).map_err(|e| e.to_string())?;
    Ok(on.contains(Capabilities::POSTCOPY_BLOCKTIME))
}

/// Ctrl-C or SIGTERM cancels the migration (the guest stays on the source)
/// instead of killing the process.
fn cancel_on_signals() -> Result<Cancel, String> {
    let cancel = Cancel::new();
    interrupt::cancel_on_signals(&cancel)
        .map_err(|e| format!("installing the Ctrl-C handler: {e}"))?;
    Ok(cancel)
}

fn dirty_log(name: &str) -> Result<DirtyLogMode, String> {
    demo::mode_from_name(name).ok_or_else(|| format!("unknown dirty-log mode '{name}'"))
}

fn uri(text: &str) -> Result<MigrationUri, String> {
    text.parse()
        .map_err(|e| format!("bad migration address '{text}': {e}"))
}

fn progress(o: &Output) -> Progress {
    if o.quiet {
        Progress::quiet()
    } else {
        Progress::new()
    }
}

/// Exit status of a migration whose end this side cannot decide (the
/// commit handshake was cut) when its paused guest was not run here: the
/// operator discarded it, or did not decide in time.
const EXIT_AMBIGUOUS: u8 = 3;

/// After an ambiguous end: tells the operator (stderr, and in --json mode
/// a `held` event on stdout) how to decide, then waits for the decision,
/// which it also records in `decided`.
fn hold(
    summary: &Summary,
    o: &Output,
    timeout_s: u64,
    decided: &mut Option<Decision>,
) -> Result<Decision, DemoError> {
    // Before the operator is told, so that an early signal is not lost.
    let hold = Hold::new().map_err(|e| DemoError::Signals(e.to_string()))?;
    let pid = std::process::id();
    if let Some(end) = summary.stats.ambiguous_end {
        let why = summary.error_desc().unwrap_or_default();
        eprintln!("livemig: migration end ambiguous ({why}): {}", end.advice());
        if o.json {
            let event = json!({
                "event": "held",
                "pid": pid,
                "ambiguous-end": end.name(),
                "hold-timeout-s": timeout_s,
            });
            println!("{event}");
        }
    }
    eprintln!(
        "livemig: the guest is held paused here (pid {pid}): send SIGUSR1 to run it here, \
         SIGTERM or SIGINT to discard it; after {timeout_s} s (--hold-timeout-s) without a \
         decision it is discarded (this copy ends with the process)"
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let d = hold
        .wait(Duration::from_secs(timeout_s))
        .map_err(|e| DemoError::Signals(format!("waiting for the operator: {e}")))?;
    *decided = Some(d);
    Ok(d)
}

/// Prints the summary; a migration that did not complete (or did not
/// verify, for `demo`) is an error line and exit status 1. After an
/// ambiguous end (`held`: the operator's decision) a guest discarded is
/// exit status [`EXIT_AMBIGUOUS`], one run here on the operator's word 0
/// if it runs (its `continued` field is true), else 1.
fn finish(
    summary: &Summary,
    o: &Output,
    need_verified: bool,
    held: Option<(Decision, &str)>,
) -> ExitCode {
    if o.json {
        println!("{}", summary.to_json());
    } else {
        print!("{}", summary.to_text());
    }
    if summary.stats.ambiguous_end.is_some() {
        return match held {
            Some((Decision::Run, continued)) => {
                if summary.extra.get(continued) == Some(&json!(true)) {
                    eprintln!("livemig: the guest runs here, as the operator decided");
                    ExitCode::SUCCESS
                } else {
                    eprintln!(
                        "livemig: the operator decided to run the guest here, but it did not \
                         run on ({continued} is false)"
                    );
                    ExitCode::FAILURE
                }
            }
            Some((Decision::Discard(sig), _)) => {
                eprintln!("livemig: the held guest is discarded (signal {sig})");
                ExitCode::from(EXIT_AMBIGUOUS)
            }
            Some((Decision::TimedOut, _)) => {
                eprintln!("livemig: the held guest is discarded (no decision in time)");
                ExitCode::from(EXIT_AMBIGUOUS)
            }
            // Not held (`demo`, which owns both sides): the sentence only.
            None => {
                if let Some(end) = summary.stats.ambiguous_end {
                    let why = summary.error_desc().unwrap_or_default();
                    eprintln!("livemig: migration end ambiguous ({why}): {}", end.advice());
                }
                ExitCode::from(EXIT_AMBIGUOUS)
            }
        };
    }
    if summary.stats.status == MigrationStatus::Cancelled {
        eprintln!("livemig: migration cancelled; the guest keeps running on the source");
        return ExitCode::FAILURE;
    }
    if summary.stats.status != MigrationStatus::Completed {
        let why = summary
            .error_desc()
            .unwrap_or_else(|| format!("ended as {}", summary.stats.status));
        eprintln!("livemig: migration failed: {why}");
        return ExitCode::FAILURE;
    }
    if need_verified && !summary.verified {
        eprintln!(
            "livemig: verification failed: the destination's memory or guest does not match the source"
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `livemig bench`: every chosen case, then the table (or one JSON object
/// per case); a run that did not verify is an error line and exit status 1.
/// What every bench case takes from the command line: runs, timings, and
/// the source's verification, audit and stop priority.
fn bench_options(a: &BenchArgs) -> BenchOptions {
    BenchOptions {
        runs: a.runs,
        warmup: Duration::from_millis(a.warmup_ms),
        run_for: Duration::from_millis(a.run_ms),
        verbose: !a.quiet,
        vcpus: a.vcpus,
        source: SourceOptions {
            verify: !a.migration.no_verify,
            audit: a.migration.audit,
            stop_priority: stop_priority(&a.migration),
            timeline_slice_ms: a.timeline.timeline_slice_ms,
            ..SourceOptions::default()
        },
    }
}

fn run_bench(a: &BenchArgs) -> Result<ExitCode, String> {
    let config = config(&a.migration, true)?;
    if a.runs == 0 {
        return Err(BenchError::NoRuns.to_string());
    }
    if a.cases.iter().any(|c| c == touch_bench::FIRST_TOUCH_CASE) {
        return run_touch_bench(a);
    }
    if !demo::kvm_available() {
        return Err(BenchError::NoKvm.to_string());
    }
    if a.cases.iter().any(|c| c == bench::MULTIFD_CASE) {
        return run_multifd_bench(a, &config);
    }
    if a.cases.iter().any(|c| c == fault_bench::POSTCOPY_CASE) {
        return run_postcopy_bench(a, &config);
    }
    let mut cases: Vec<BenchCase> = if a.cases.is_empty() {
        bench::CASES.to_vec()
    } else {
        a.cases
            .iter()
            .map(|n| BenchCase::by_name(n).ok_or_else(|| format!("unknown bench case '{n}'")))
            .collect::<Result<_, _>>()?
    };
    if let Some(mem) = a.mem_mib_override {
        cases = cases.into_iter().map(|c| c.scaled(mem)).collect();
    }
    let opts = bench_options(a);
    if a.verify_cost {
        return run_verify_cost_bench(a, &cases, &opts, &config);
    }
    let qemu = if a.vs_qemu {
        match qemu::find_qemu() {
            Some(path) => Some((qemu::qemu_version(&path).map_err(|e| e.to_string())?, path)),
            None => {
                eprintln!(
                    "livemig: bench: --vs-qemu: {} is not on PATH: the QEMU part is SKIPPED",
                    qemu::QEMU_BINARY
                );
                None
            }
        }
    } else {
        None
    };
    let cancel = cancel_on_signals()?;
    let data = bench::guest_like_data(bench::COPY_BUFFER_BYTES);
    let mut results = Vec::new();
    let mut comparisons = Vec::new();
    for case in cases {
        let result = match &qemu {
            Some((version, path)) => {
                let c = vs_qemu::run_case(case, &opts, &config, &data, path, &cancel)
                    .map_err(|e| e.to_string())?;
                if a.json {
                    println!("{}", c.to_json(version));
                }
                let livemig = c.livemig.clone();
                comparisons.push(c);
                livemig
            }
            None => {
                let r = bench::run_case(case, &opts, &config, &data, &cancel)
                    .map_err(|e| e.to_string())?;
                if a.json {
                    println!("{}", r.to_json());
                }
                r
            }
        };
        results.push(result);
    }
    if !a.json {
        print!("{}", bench::table(&results));
        print!("{}", bench::breakdown_table(&results));
        if let Some((version, _)) = &qemu {
            print!("{}", vs_qemu::table(&comparisons, version));
        }
    }
    let mut code = ExitCode::SUCCESS;
    if let Some(path) = &a.timeline.timeline {
        for r in &results {
            let file = if results.len() == 1 {
                path.clone()
            } else {
                per_case(path, r.case.name)
            };
            let summary = r.median_downtime_run().map(|run| &run.summary);
            code = draw_timeline(summary, Some(&file), code);
        }
    }
    for r in &results {
        for (i, run) in r.runs.iter().enumerate() {
            if !run.verified() {
                let why = run
                    .summary
                    .error_desc()
                    .unwrap_or_else(|| "the destination does not match the source".into());
                eprintln!(
                    "livemig: bench: run {} of {} did not verify: {why}",
                    i + 1,
                    r.case.name
                );
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

/// `livemig bench --verify-cost`: each case verified and not, alternating;
/// a run either way that did not verify is an error line and exit status 1.
fn run_verify_cost_bench(
    a: &BenchArgs,
    cases: &[BenchCase],
    opts: &BenchOptions,
    config: &MigrationConfig,
) -> Result<ExitCode, String> {
    let cancel = cancel_on_signals()?;
    let data = bench::guest_like_data(bench::COPY_BUFFER_BYTES);
    let mut code = ExitCode::SUCCESS;
    for &case in cases {
        let cost =
            verify_cost::run_case(case, opts, config, &data, &cancel).map_err(|e| e.to_string())?;
        if a.json {
            println!("{}", cost.to_json());
        } else {
            print!("{}", cost.table());
        }
        if !cost.verified() {
            eprintln!(
                "livemig: bench: a run of {} did not verify (verification on or off)",
                case.name
            );
            code = ExitCode::FAILURE;
        }
    }
    Ok(code)
}

/// `livemig bench --case multifd`: 1, 2 and N channels (N from
/// `--param multifd-channels`, 4 when that is 2 or less), into a fresh and
/// into a preallocated destination, against as many raw TCP streams, on a guest of `--mem-mib` (default 1024) MiB whose RAM
/// is all non-zero pages.
fn run_multifd_bench(a: &BenchArgs, config: &MigrationConfig) -> Result<ExitCode, String> {
    if a.cases.len() != 1 {
        return Err(format!(
            "bench case '{}' runs alone: give it as the only --case",
            bench::MULTIFD_CASE
        ));
    }
    let n = match config.parameters.multifd_channels {
        c if c > 2 => c,
        _ => 4,
    };
    let opts = bench_options(a);
    let cancel = cancel_on_signals()?;
    let data = bench::guest_like_data(bench::COPY_BUFFER_BYTES);
    let runs = bench::run_multifd(
        a.mem_mib_override.unwrap_or(1024),
        &[1, 2, n],
        &opts,
        config,
        &data,
        &cancel,
    )
    .map_err(|e| e.to_string())?;
    if a.json {
        for r in &runs {
            println!("{}", r.to_json());
        }
    } else {
        print!("{}", bench::multifd_table(&runs));
    }
    if runs.iter().all(|r| r.summary.verified) {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("livemig: bench: a multifd run did not verify");
        Ok(ExitCode::FAILURE)
    }
}

/// `livemig bench --case first-touch`: a page's first write into fresh
/// memory by memcpy and by socket read, against a reused buffer, in
/// `--mem-mib-override` (default 256) MiB per measurement.
fn run_touch_bench(a: &BenchArgs) -> Result<ExitCode, String> {
    if a.cases.len() != 1 {
        return Err(format!(
            "bench case '{}' runs alone: give it as the only --case",
            touch_bench::FIRST_TOUCH_CASE
        ));
    }
    let mib = a.mem_mib_override.map_or(256, |m| m as usize);
    let runs = touch_bench::run(mib, a.runs as usize, !a.quiet).map_err(|e| e.to_string())?;
    let hashes = (0..a.runs)
        .map(|_| touch_bench::hash_cost(mib))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    print!("{}", touch_bench::table(&runs, &hashes, mib));
    Ok(ExitCode::SUCCESS)
}

/// `livemig bench --case postcopy`: the userfaultfd round trip, alone and
/// over loopback TCP, then a postcopy migration with preempt of a busy
/// guest of `--mem-mib` (default 1024) MiB, per round.
fn run_postcopy_bench(a: &BenchArgs, config: &MigrationConfig) -> Result<ExitCode, String> {
    if a.cases.len() != 1 {
        return Err(format!(
            "bench case '{}' runs alone: give it as the only --case",
            fault_bench::POSTCOPY_CASE
        ));
    }
    let guest = match a.mem_mib_override {
        Some(mem) => fault_bench::POSTCOPY_GUEST.scaled(mem),
        None => fault_bench::POSTCOPY_GUEST,
    };
    let config = fault_bench::postcopy_config(config, guest, |name| {
        options::sets_param(&a.migration.params, name)
    });
    let opts = bench_options(a);
    let cancel = cancel_on_signals()?;
    let runs = fault_bench::run(guest, &opts, &config, &cancel).map_err(|e| e.to_string())?;
    if a.json {
        let pooled = fault_bench::Pooled::of(&runs).map(|p| p.to_json());
        let runs: Vec<_> = runs.iter().map(fault_bench::FaultRun::to_json).collect();
        println!("{}", serde_json::json!({ "pooled": pooled, "runs": runs }));
    } else {
        print!("{}", fault_bench::table(guest, &runs));
    }
    if runs.iter().all(|r| r.summary.verified) {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("livemig: bench: a postcopy run did not verify");
        Ok(ExitCode::FAILURE)
    }
}

/// `--timeline`: draws the summary's timeline into `path` (nothing without
/// a path) after the summary was printed. A failure is one line and exit
/// status 1; else `code` stands.
fn draw_timeline(summary: Option<&Summary>, path: Option<&Path>, code: ExitCode) -> ExitCode {
    let Some(path) = path else {
        return code;
    };
    let Some(chart) = summary.and_then(|s| s.timeline.as_ref()) else {
        eprintln!("livemig: --timeline: no KVM migration ran to draw");
        return ExitCode::FAILURE;
    };
    match timeline::draw(chart, path) {
        Ok(()) => code,
        Err(e) => {
            eprintln!("livemig: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `FILE.svg` for `case`: `FILE-case.svg`.
fn per_case(path: &Path, case: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(|| "timeline".into(), |s| s.to_string_lossy().into_owned());
    let ext = path
        .extension()
        .map_or_else(|| "svg".into(), |e| e.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-{case}.{ext}"))
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let err = |e: DemoError| e.to_string();
    match cli.command {
        Cmd::Run(a) => {
            let report = run::run(&run::RunOptions {
                vcpus: a.vcpus,
                mem_mib: a.mem_mib,
                dirty_mib: a.dirty_mib,
                run: Duration::from_millis(a.run_ms),
            })
            .map_err(|e| e.to_string())?;
            if a.json {
                println!("{}", report.to_json());
            } else {
                println!("{report}");
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Demo(a) => {
            let mut config = config(&a.migration, true)?;
            if a.cut_after_ms.is_some() && a.migration.mode != "postcopy" {
                return Err(
                    "--cut-after-ms needs --mode postcopy: only a postcopy pauses and \
                     recovers when its connection is cut"
                        .into(),
                );
            }
            if a.cut_after_ms.is_some()
                && !options::sets_param(&a.migration.params, "max-postcopy-bandwidth")
            {
                // The demo's postcopy can end in well under 200 ms: held
                // back, its background pass is still running at the cut.
                config.parameters.max_postcopy_bandwidth = CUT_POSTCOPY_BANDWIDTH;
            }
            if a.mem_prealloc && config.capabilities.contains(Capabilities::POSTCOPY_RAM) {
                return Err(
                    "--mem-prealloc with postcopy: userfaultfd reports only missing pages, \
                     and a preallocated destination has none, so it refuses postcopy"
                        .into(),
                );
            }
            config.limits.max_time_ms = (a.time_limit_s > 0).then(|| a.time_limit_s * 1000);
            let shape = a.workload.shape(a.mem_mib)?;
            let summary = match demo::open_kvm() {
                Ok(()) => demo::run_demo_with(
                    shape,
                    &config,
                    SourceOptions {
                        timeline_slice_ms: a.timeline.timeline_slice_ms,
                        ..source_options(&a.migration, &a.workload, true)
                    },
                    demo::MemoryCheck::Digest,
                    a.mem_prealloc,
                    a.workload.warmup(),
                    Duration::from_millis(a.run_ms),
                    a.cut_after_ms.map(Duration::from_millis),
                    &cancel_on_signals()?,
                    &mut progress(&a.output),
                )
                .map_err(err)?,
                Err(e) if a.timeline.timeline.is_some() => {
                    return Err(format!(
                        "--timeline needs KVM, and {}: the simulated fallback records no timeline",
                        demo::no_kvm_reason(&e)
                    ));
                }
                Err(e) if a.cut_after_ms.is_some() => {
                    return Err(format!(
                        "--cut-after-ms needs KVM, and {}: the simulated fallback has no connection to cut",
                        demo::no_kvm_reason(&e)
                    ));
                }
                Err(e) if a.workload.vcpus.is_some() => {
                    return Err(format!(
                        "--vcpus needs KVM, and {}: the simulated fallback has no vCPUs",
                        demo::no_kvm_reason(&e)
                    ));
                }
                Err(e) => {
                    eprintln!("{}", demo::no_kvm_line(&e));
                    demo::run_simulated(shape, &config).map_err(err)?
                }
            };
            let code = finish(&summary, &a.output, true, None);
            Ok(draw_timeline(
                Some(&summary),
                a.timeline.timeline.as_deref(),
                code,
            ))
        }
        Cmd::Send(a) => {
            let mut config = config(&a.migration, false)?;
            config.limits.max_time_ms = (a.time_limit_s > 0).then(|| a.time_limit_s * 1000);
            let shape = a.workload.shape(a.mem_mib)?;
            let mut decided = None;
            let recovery = Recovery {
                address: a.resume_to.as_deref().map(uri).transpose()?,
                timeout: Duration::from_secs(a.recover_timeout_s),
            };
            let summary = demo::run_send(
                &uri(&a.to)?,
                shape,
                &config,
                SourceOptions {
                    recovery,
                    timeline_slice_ms: a.timeline.timeline_slice_ms,
                    ..source_options(&a.migration, &a.workload, false)
                },
                a.workload.warmup(),
                &cancel_on_signals()?,
                &mut progress(&a.output),
                EventLog::new(a.output.json),
                &mut |s| hold(s, &a.output, a.hold_timeout_s, &mut decided),
            )
            .map_err(err)?;
            let held = decided.map(|d| (d, "guest-continued-on-source"));
            let code = finish(&summary, &a.output, false, held);
            Ok(draw_timeline(
                Some(&summary),
                a.timeline.timeline.as_deref(),
                code,
            ))
        }
        Cmd::Receive(a) => {
            let blocktime = receive_blocktime(&a.caps)?;
            if a.mem_prealloc && blocktime {
                return Err(
                    "--mem-prealloc with --cap postcopy-blocktime=on: a preallocated \
                     destination refuses postcopy, so there would be no blocktime to report"
                        .into(),
                );
            }
            let mut decided = None;
            let summary = demo::run_receive(
                &uri(&a.listen)?,
                a.mem_mib,
                a.vcpus,
                Duration::from_millis(a.run_ms),
                // The migration verifies itself; `--digest` adds a second
                // opinion the operator (or `demo`) compares with the
                // source's, computed inside the stop.
                ReceiveOptions {
                    idle_timeout: Duration::from_millis(a.idle_timeout_ms),
                    digest: a.digest,
                    recovery: Recovery {
                        address: a.recover_listen.as_deref().map(uri).transpose()?,
                        timeout: Duration::from_secs(a.recover_timeout_s),
                    },
                    stop_priority: (!a.no_stop_priority).then_some(StopPriority::Realtime),
                    mem_prealloc: a.mem_prealloc,
                    ..ReceiveOptions::default()
                },
                blocktime,
                a.digest_unwritten,
                &mut std::io::stdout(),
                &mut progress(&a.output),
                EventLog::new(a.output.json),
                &mut |s| hold(s, &a.output, a.hold_timeout_s, &mut decided),
            )
            .map_err(err)?;
            let held = decided.map(|d| (d, "guest-continued"));
            Ok(finish(&summary, &a.output, false, held))
        }
        Cmd::Bench(a) => run_bench(&a),
        Cmd::BenchSink(a) => {
            bench::run_sink(&uri(&a.listen)?, a.memory, &mut std::io::stdout())
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("livemig: {e}");
            ExitCode::FAILURE
        }
    }
}
