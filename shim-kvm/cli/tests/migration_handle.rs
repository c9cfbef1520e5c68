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

use common::{demo_vm, kvm_available, small_ws, wait_for};
use livemig_core::capabilities::Capabilities;
use livemig_core::config::MigrationConfig;
use livemig_core::status::MigrationStatus;
use livemig_kvm::guest;
use livemig_kvm::memory::DEFAULT_SLOT_BYTES;
use livemig_kvm::migrate::destination::{self, DestinationReport};
use livemig_kvm::migrate::source::{self, SourceOptions};
use livemig_kvm::transport::{Connection, Listener, MigrationUri};
use livemig_kvm::vcpu::Vcpu;
use livemig_kvm::vm::Vm;

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A source guest running its working set, a destination VM of the same
/// size, and the connection between them: (source VM, source vCPU,
/// destination VM, destination vCPU, source's end, destination's end).
#[allow(clippy::type_complexity)]
fn two_vms(
    tag: &str,
) -> (
    Arc<Vm>,
    Arc<Vcpu>,
    Arc<Vm>,
    Arc<Vcpu>,
    Connection,
    Connection,
) {
    let (vm, vcpu) = demo_vm(RAM, &small_ws());
    vcpu.resume().expect("start the source guest");
    wait_for(&vcpu, TIMEOUT, "a generation", |v| {
        v.stats().generation >= 1
    });
    let dst_vm = Vm::new(RAM, DEFAULT_SLOT_BYTES).expect("destination VM");
    let dst_vcpu = Vcpu::new(&dst_vm).expect("destination vCPU");
    let path =
        std::env::temp_dir().join(format!("livemig-handle-{tag}-{}.sock", std::process::id()));
    let listener = Listener::bind(&MigrationUri::Unix(path)).expect("listen");
    let ours = Connection::connect(&listener.local_uri().expect("address")).expect("connect");
    let theirs = listener.accept().expect("accept");
    (
        Arc::new(vm),
        Arc::new(vcpu),
        Arc::new(dst_vm),
        Arc::new(dst_vcpu),
        ours,
        theirs,
    )
}

/// A precopy with the return path, at `max_bandwidth` bytes/s.
fn config(max_bandwidth: u64) -> MigrationConfig {
    let mut c = MigrationConfig::default();
    c.capabilities.insert(Capabilities::RETURN_PATH);
    c.parameters.max_bandwidth = max_bandwidth;
    c
}

/// Starts the destination on its own thread.
fn receive(
    vm: &Arc<Vm>,
    vcpu: &Arc<Vcpu>,
    conn: Connection,
) -> thread::JoinHandle<DestinationReport> {
    let handle = destination::receive(Arc::clone(vm), Arc::clone(vcpu), conn, TIMEOUT)
        .expect("start receiving");
    thread::spawn(move || handle.join().expect("receive ran"))
}

#[test]
fn stats_advance_while_a_migration_runs_and_it_completes_verified() {
    if !kvm_available() {
        return;
    }
    let (vm, vcpu, dst_vm, dst_vcpu, ours, theirs) = two_vms("complete");
    let dest = receive(&dst_vm, &dst_vcpu, theirs);
    // 4 MiB of working set at 16 MiB/s: a few hundred ms, long enough to
    // be watched.
    let handle = source::migrate(
        Arc::clone(&vm),
        Arc::clone(&vcpu),
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

    // The source's vCPU stays stopped after a completed migration: its
    // memory is the stop image.
    let stamped_at_stop = guest::stamped(vm.ram()).expect("stamp counter");
    let at_stop = vm.ram().digest();
    let loaded: DestinationReport = dest.join().expect("destination thread");
    assert!(loaded.error.is_none(), "{:?}", loaded.error);
    assert_eq!(loaded.digest, Some(at_stop), "destination memory differs");
    let after = destination::start_guest(&dst_vm, &dst_vcpu, Duration::from_millis(500))
        .expect("start the destination guest");
    assert!(
        after.continued(Some(stamped_at_stop)),
        "the guest did not continue on the destination: {after:?}"
    );
}

#[test]
fn a_cancel_from_another_thread_ends_an_active_migration_with_the_guest_on_the_source() {
    if !kvm_available() {
        return;
    }
    let (vm, vcpu, dst_vm, dst_vcpu, ours, theirs) = two_vms("cancel");
    let dest = receive(&dst_vm, &dst_vcpu, theirs);
    // 1 MiB/s against a working set the guest rewrites all the time: the
    // migration stays active until it is cancelled.
    let handle = Arc::new(
        source::migrate(
            Arc::clone(&vm),
            Arc::clone(&vcpu),
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
    assert!(report.vcpu_stopped_ns.is_none(), "the guest was stopped");

    // The guest runs on at the source, intact.
    let before = vcpu.stats().generation;
    wait_for(&vcpu, TIMEOUT, "generations after the cancel", |v| {
        v.stats().generation >= before + 2
    });
    assert!(vcpu.stopped().is_none());
    assert!(
        vcpu.stats().mismatches.is_empty(),
        "the source guest saw a mismatch"
    );
    vcpu.pause().expect("pause for the stamp check");
    let stamps = guest::check_stamps(vm.ram()).expect("stamps");
    assert!(stamps.ok(), "{stamps:?}");

    // The destination refused to start a guest it did not get whole.
    let loaded = dest.join().expect("destination thread");
    assert!(loaded.error.is_some(), "the destination did not fail");
    assert!(loaded.digest.is_none());
    assert_eq!(dst_vcpu.stats().generation, 0, "the destination guest ran");
}
