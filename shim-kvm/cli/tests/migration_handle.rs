//! Real-KVM tests of the migration handle: `migrate` and `receive` run on
//! threads of their own, and other threads watch them through the handle.
//!
//! - A migration that completes: `stats()` advances while it runs, the
//!   destination's memory equals the source's at the stop, and the guest
//!   continues on the destination.
//! - A cancel from another thread during an active migration ends it
//!   `cancelled`, with the guest running on at the source and the
//!   destination refusing to start it.
//!
//! Each test skips loudly without `/dev/kvm` (see `common::kvm_available`).

// The process helpers serve the CLI tests.
#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::kvm_available;
use livemig_cli::demo::{self, GuestShape};
use livemig_cli::guest;
use livemig_cli::vmm::DemoVmm;
use livemig_cli::watch::{GuestAfter, GuestAtStop};
use livemig_core::capabilities::Capabilities;
use livemig_core::config::MigrationConfig;
use livemig_core::status::MigrationStatus;
use livemig_kvm::dirty_log::DirtyLogMode;
use livemig_kvm::transport::{Listener, MigrationUri};
use livemig_kvm::{Connection, DestinationReport, ReceiveOptions, SourceOptions};

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Two vCPUs sharing a 4 MiB working set in 64 MiB of RAM.
const SHAPE: GuestShape = GuestShape {
    mem_mib: 64,
    dirty_mib: 4,
    dirty_log: DirtyLogMode::ManualProtect,
    vcpus: 2,
    fill: false,
};

/// A source guest running its working set, an empty destination VMM of
/// the same shape, and the connection between them.
fn two_vmms(tag: &str) -> (DemoVmm, DemoVmm, Connection, Connection) {
    let src = demo::boot_guest(SHAPE, Duration::from_millis(100)).expect("source guest");
    let dst = demo::empty_vmm(SHAPE.mem_mib, SHAPE.vcpus).expect("destination VMM");
    let path =
        std::env::temp_dir().join(format!("livemig-handle-{tag}-{}.sock", std::process::id()));
    let listener = Listener::bind(&MigrationUri::Unix(path)).expect("listen");
    let ours = Connection::connect(&listener.local_uri().expect("address")).expect("connect");
    let theirs = listener.accept().expect("accept");
    (src, dst, ours, theirs)
}

/// A precopy with the return path, at `max_bandwidth` bytes/s.
fn config(max_bandwidth: u64) -> MigrationConfig {
    let mut c = MigrationConfig::default();
    c.capabilities.insert(Capabilities::RETURN_PATH);
    c.parameters.max_bandwidth = max_bandwidth;
    c
}

/// Starts the destination on its own thread, digesting what it loaded.
fn receive(dst: &DemoVmm, conn: Connection) -> thread::JoinHandle<DestinationReport> {
    let options = ReceiveOptions {
        idle_timeout: TIMEOUT,
        digest: true,
        ..ReceiveOptions::default()
    };
    let handle =
        livemig_kvm::receive(demo::destination_vm(dst), conn, options).expect("start receiving");
    thread::spawn(move || handle.join().expect("receive ran"))
}

/// The guest's generations, summed over its vCPUs.
fn generations(vmm: &DemoVmm) -> u64 {
    (0..vmm.vcpu_count() as usize)
        .map(|v| vmm.vcpus().report(v).expect("vCPU report").generation)
        .sum()
}

#[test]
fn stats_advance_while_a_migration_runs_and_it_completes_verified() {
    if !kvm_available() {
        return;
    }
    let (src, dst, ours, theirs) = two_vmms("complete");
    let dest = receive(&dst, theirs);
    // 4 MiB of working set at 16 MiB/s: a few hundred ms, long enough to
    // be watched.
    let handle = livemig_kvm::migrate(
        demo::source_vm(&src),
        ours,
        &config(16 * MIB),
        SourceOptions::default(),
    )
    .expect("start migrating");
    let mut seen = Vec::new();
    let start = Instant::now();
    while !handle.wait_timeout(Duration::from_millis(10)) {
        assert!(start.elapsed() < TIMEOUT, "the migration did not end");
        let s = handle.stats();
        if seen.last() != Some(&s.ram.transferred) {
            seen.push(s.ram.transferred);
        }
    }
    assert!(handle.is_finished());
    let report = handle.join().expect("the migration ran");
    assert_eq!(
        report.stats.status,
        MigrationStatus::Completed,
        "{}",
        report.stats.error_desc
    );
    // Read from another thread while it ran, the figures grew.
    assert!(
        seen.iter().filter(|&&t| t > 0).count() >= 2,
        "stats() did not advance while the migration ran: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(report.stats.ram.transferred >= *seen.last().unwrap());

    // The source's vCPUs stay paused after a completed migration: its
    // memory is the stop image.
    let at_stop = GuestAtStop::read(&src).expect("the stopped source guest");
    let digest = src.guest_memory().digest();
    let loaded: DestinationReport = dest.join().expect("destination thread");
    assert!(loaded.error.is_none(), "{:?}", loaded.error);
    assert!(loaded.started, "the running guest arrived paused");
    assert_eq!(loaded.digest, Some(digest), "destination memory differs");
    let after = GuestAfter::watch(&dst, Duration::from_millis(500)).expect("the destination guest");
    assert!(
        after.continued(&at_stop),
        "the guest did not continue on the destination: {:?} from {at_stop:?}",
        after.continuity(&at_stop)
    );
}

#[test]
fn a_cancel_from_another_thread_ends_an_active_migration_with_the_guest_on_the_source() {
    if !kvm_available() {
        return;
    }
    let (src, dst, ours, theirs) = two_vmms("cancel");
    let dest = receive(&dst, theirs);
    // 1 MiB/s against a working set the guest rewrites all the time: the
    // migration stays active until it is cancelled.
    let handle = Arc::new(
        livemig_kvm::migrate(
            demo::source_vm(&src),
            ours,
            &config(MIB),
            SourceOptions::default(),
        )
        .expect("start migrating"),
    );
    let canceller = {
        let handle = Arc::clone(&handle);
        thread::spawn(move || {
            // Active, and bytes flowing: two readings apart.
            let start = Instant::now();
            let first = loop {
                let s = handle.stats();
                if s.status == MigrationStatus::Active && s.ram.transferred > 0 {
                    break s.ram.transferred;
                }
                assert!(
                    start.elapsed() < TIMEOUT,
                    "the migration never became active"
                );
                thread::sleep(Duration::from_millis(10));
            };
            while handle.stats().ram.transferred == first {
                assert!(start.elapsed() < TIMEOUT, "the migration stalled");
                thread::sleep(Duration::from_millis(10));
            }
            assert!(!handle.is_finished(), "ended before the cancel");
            handle.cancel();
        })
    };
    canceller.join().expect("the cancelling thread");
    assert!(handle.wait_timeout(TIMEOUT), "the cancel did not end it");
    let handle = Arc::into_inner(handle).expect("the only handle left");
    assert_eq!(
        handle.cancel_refused(),
        None,
        "a precopy cancel is carried out"
    );
    let report = handle.join().expect("the migration ran");
    assert_eq!(
        report.stats.status,
        MigrationStatus::Cancelled,
        "{}",
        report.stats.error_desc
    );
    assert!(report.failure.is_none(), "{:?}", report.failure);
    assert!(report.stop.requested_ns.is_none(), "the guest was stopped");

    // The guest runs on at the source, intact.
    let before = generations(&src);
    let start = Instant::now();
    while generations(&src) < before + 2 * u64::from(SHAPE.vcpus) {
        assert!(src.vcpus().stopped().is_none(), "a source vCPU stopped");
        assert!(
            start.elapsed() < TIMEOUT,
            "the source guest stopped running"
        );
        thread::sleep(Duration::from_millis(5));
    }
    src.vcpus().pause().expect("pause for the stamp check");
    for v in 0..SHAPE.vcpus as usize {
        let r = src.vcpus().report(v).expect("vCPU report");
        assert!(r.mismatches.is_empty(), "vCPU {v} saw a mismatch: {r:?}");
    }
    let stamps = guest::check_stamps(src.guest_memory()).expect("stamps");
    assert!(stamps.ok(), "{stamps:?}");

    // The destination refused to start a guest it did not get whole.
    let loaded = dest.join().expect("destination thread");
    assert!(loaded.error.is_some(), "the destination did not fail");
    assert!(loaded.digest.is_none());
    assert!(!loaded.started);
    assert_eq!(generations(&dst), 0, "the destination guest ran");
    assert_eq!(dst.vcpus().report(0).expect("report").progress_exits, 0);
}
