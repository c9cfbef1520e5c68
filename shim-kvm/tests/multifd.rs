//! Multifd between two in-process test VMMs (`support/`), through
//! livemig-kvm's public API: the source hands its channel connections to
//! [`migrate_with_channels`], the destination accepts them on its listener
//! in [`receive_with_channels`]. A migration over two channels arrives
//! with memory equal and every vCPU going on; one channel's socket shut
//! down mid-migration fails it with the source guest running on and the
//! destination guest never started; a peer that lies on a channel (a
//! packet in sequence after the last pass's sync, forged by a proxy) is
//! refused by the seal at the digest, the source guest running on. Each
//! test skips loudly without `/dev/kvm`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use livemig_core::capabilities::Capabilities;
use livemig_core::config::MigrationConfig;
use livemig_core::digest::Verification;
use livemig_core::status::MigrationStatus;
use livemig_kvm::transport::{Listener, MigrationUri};
use livemig_kvm::{
    Connection, DestinationReport, DestinationVm, MigrateError, ReceiveOptions, SourceOptions,
    SourceReport, SourceVm, Vcpus, migrate, migrate_with_channels, receive_with_channels,
};
use support::{HIGH_GPA, TestVm, kvm_available};
use vm_memory::{Bytes, GuestAddress};

const VCPUS: usize = 4;
const CHANNELS: u8 = 2;

fn config() -> MigrationConfig {
    let mut config = MigrationConfig {
        capabilities: Capabilities::ZERO_PAGE_DETECTION
            | Capabilities::RETURN_PATH
            | Capabilities::MULTIFD,
        ..MigrationConfig::default()
    };
    config.parameters.multifd_channels = CHANNELS;
    config
}

/// Boots a 4-vCPU source with most of its RAM non-zero (so pages, not
/// zero entries, cross the channels) and lets it count a little.
fn running_source() -> TestVm {
    let src = TestVm::new(VCPUS, true, |_| {});
    let fill: Vec<u8> = (0..768 * 1024).map(|i| (i % 251) as u8 + 1).collect();
    src.ram
        .write_slice(&fill, GuestAddress(0x40000))
        .expect("fill low RAM");
    src.ram
        .write_slice(&fill[..512 * 1024], GuestAddress(HIGH_GPA))
        .expect("fill high RAM");
    src.vcpus.resume_all().expect("start the source guest");
    assert!(
        src.counters_pass(&[10; VCPUS]),
        "the source guest does not run"
    );
    src
}

fn destination_vm(dst: &TestVm) -> DestinationVm {
    DestinationVm {
        vm: Arc::clone(&dst.vm),
        memory: dst.memory.clone(),
        vcpus: dst.vcpus.clone(),
        devices: Vec::new(),
        on_started: None,
    }
}

fn source_vm(src: &TestVm) -> SourceVm {
    SourceVm {
        vm: Arc::clone(&src.vm),
        memory: src.memory.clone(),
        vcpus: src.vcpus.clone(),
        devices: Vec::new(),
        device_dirty: None,
        running: true,
    }
}

/// A TCP listener on loopback and its address.
fn listen() -> (Listener, MigrationUri) {
    let any: MigrationUri = "tcp:127.0.0.1:0".parse().expect("address");
    let listener = Listener::bind(&any).expect("bind");
    let uri = listener.local_uri().expect("local address");
    (listener, uri)
}

/// Starts a destination on its own thread that accepts the main
/// connection, then receives with channels on the same listener
/// (preallocating its RAM first with `mem_prealloc`).
fn destination(
    dst: &TestVm,
    listener: Listener,
    mem_prealloc: bool,
) -> std::thread::JoinHandle<DestinationReport> {
    let vm = destination_vm(dst);
    std::thread::spawn(move || {
        let conn = listener.accept().expect("accept the main connection");
        let options = ReceiveOptions {
            digest: true,
            idle_timeout: Duration::from_secs(10),
            mem_prealloc,
            ..ReceiveOptions::default()
        };
        receive_with_channels(vm, conn, listener, options)
            .expect("receive")
            .join()
            .expect("destination report")
    })
}

/// The main connection, then the channels.
fn connect(uri: &MigrationUri) -> (Connection, Vec<Connection>) {
    let main = Connection::connect(uri).expect("connect");
    let channels = (0..CHANNELS)
        .map(|_| Connection::connect(uri).expect("connect a channel"))
        .collect();
    (main, channels)
}

/// The destination never ran its guest, and the source guest runs on.
fn assert_source_runs_on(src: &TestVm, dst: &TestVm, destination: &DestinationReport) {
    assert!(!destination.started);
    assert_eq!(dst.vcpus.resumes(), 0, "the destination guest ran");
    assert!(!src.vcpus.is_paused(), "the source guest did not resume");
    let now = src.counters();
    assert!(src.counters_pass(&now), "the source guest does not go on");
}

#[test]
fn two_channels_carry_the_guest_with_memory_equal_and_every_vcpu_goes_on() {
    if !kvm_available() {
        return;
    }
    let src = running_source();
    let dst = TestVm::new(VCPUS, false, |_| {});
    let (listener, uri) = listen();
    let incoming = destination(&dst, listener, false);
    let (main, channels) = connect(&uri);
    let source: SourceReport = migrate_with_channels(
        source_vm(&src),
        main,
        channels,
        &config(),
        SourceOptions::default(),
    )
    .expect("migrate")
    .join()
    .expect("source report");
    let destination = incoming.join().expect("destination thread");
    assert_eq!(
        source.stats.status,
        MigrationStatus::Completed,
        "{}",
        source.stats.error_desc
    );
    assert!(destination.error.is_none(), "{:?}", destination.error);
    // Both ends verified in-protocol: the receivers booked the pages they
    // placed.
    assert_eq!(source.stats.verification, Verification::Verified);
    assert_eq!(destination.stats.verification, Verification::Verified);
    // The source guest stays paused after a completed migration: its
    // memory is the stop image.
    assert!(src.vcpus.is_paused(), "both hosts run the guest");
    assert_eq!(destination.digest, Some(src.memory.digest()));
    assert!(destination.started);
    let at_stop = src.counters();
    assert!(
        dst.counters_pass(&at_stop),
        "a vCPU did not go on: {:?}",
        dst.vcpus.failure()
    );
    // The pages went over the channels, and both ends counted them alike.
    assert!(source.stats.ram.multifd_bytes > 1 << 20);
    assert_eq!(source.stats.ram.normal, destination.stats.ram.normal);
    // The receivers populated each piece's memory before reading into it
    // (ReceiveOptions::populate, on by default), only what was sent, and
    // each page once: no more pages than the source had populated.
    assert_eq!(destination.populate_refused, None);
    assert!(destination.populated_pages > 256);
    let ram = &source.stats.ram;
    let populated_there = ram.total / 4096 - ram.unpopulated;
    assert!(destination.populated_pages <= populated_there);
}

#[test]
fn a_channel_shut_down_mid_migration_fails_it_and_the_source_guest_runs_on() {
    if !kvm_available() {
        return;
    }
    let src = running_source();
    let dst = TestVm::new(VCPUS, false, |_| {});
    let (listener, uri) = listen();
    let incoming = destination(&dst, listener, false);
    let (main, channels) = connect(&uri);
    let victim = channels[1].try_clone().expect("clone a channel");
    let mut config = config();
    // 1 MiB/s: the first pass of 1.25 MiB of data takes about a second.
    config.parameters.max_bandwidth = 1 << 20;
    let handle = migrate_with_channels(
        source_vm(&src),
        main,
        channels,
        &config,
        SourceOptions::default(),
    )
    .expect("migrate");
    while handle.stats().ram.multifd_bytes < 256 * 1024 && !handle.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!handle.is_finished(), "the migration ended before the cut");
    victim
        .shutdown(std::net::Shutdown::Both)
        .expect("shut the channel down");
    let source = handle.join().expect("source report");
    let destination = incoming.join().expect("destination thread");
    assert_eq!(source.stats.status, MigrationStatus::Failed);
    assert!(
        source
            .stats
            .error_desc
            .as_str()
            .contains("multifd channel 1")
            || source.stats.error_desc.as_str().contains("destination"),
        "source said: {}",
        source.stats.error_desc
    );
    assert!(destination.error.is_some(), "the destination did not fail");
    assert_source_runs_on(&src, &dst, &destination);
}

#[test]
fn a_source_without_its_channels_is_refused_before_it_starts() {
    if !kvm_available() {
        return;
    }
    let src = running_source();
    let (_listener, uri) = listen();
    let main = Connection::connect(&uri).expect("connect");
    let refused = migrate(source_vm(&src), main, &config(), SourceOptions::default());
    assert!(
        matches!(
            refused,
            Err(MigrateError::ChannelCount {
                expected: 2,
                given: 0
            })
        ),
        "{:?}",
        refused.err()
    );
    assert!(!src.vcpus.is_paused());
}

/// Whether the page of `memory` at `gpa` is resident (`mincore`).
fn resident(memory: &livemig_kvm::memory::GuestMemory, gpa: u64) -> bool {
    let (host, len) = memory.host_range(gpa, 4096).expect("a page of RAM");
    let mut vec = [0u8; 1];
    // SAFETY: `host` is the page-aligned start of one page of a live
    // mapping; mincore only reads the page tables and writes `vec`.
    let r = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    vec[0] & 1 == 1
}

#[test]
fn a_preallocated_destination_receives_over_two_channels_with_memory_equal() {
    if !kvm_available() {
        return;
    }
    let src = running_source();
    let dst = TestVm::new(VCPUS, false, |_| {});
    // The last low page: zero on the source, so never sent as data.
    let unsent = support::LOW_BYTES as u64 - 4096;
    assert!(
        !resident(&dst.memory, unsent),
        "fresh RAM is already resident"
    );
    let (listener, uri) = listen();
    let incoming = destination(&dst, listener, true);
    let (main, channels) = connect(&uri);
    let source = migrate_with_channels(
        source_vm(&src),
        main,
        channels,
        &config(),
        SourceOptions::default(),
    )
    .expect("migrate")
    .join()
    .expect("source report");
    let destination = incoming.join().expect("destination thread");
    assert_eq!(
        source.stats.status,
        MigrationStatus::Completed,
        "{}",
        source.stats.error_desc
    );
    assert!(destination.error.is_none(), "{:?}", destination.error);
    assert_eq!(source.stats.verification, Verification::Verified);
    assert_eq!(destination.stats.verification, Verification::Verified);
    assert!(src.vcpus.is_paused(), "both hosts run the guest");
    assert_eq!(destination.digest, Some(src.memory.digest()));
    assert!(destination.started);
    let at_stop = src.counters();
    assert!(
        dst.counters_pass(&at_stop),
        "a vCPU did not go on: {:?}",
        dst.vcpus.failure()
    );
    assert!(source.stats.ram.multifd_bytes > 1 << 20);
    // All of RAM was populated before the stream, a page never sent too,
    // and nothing was populated again page run by page run.
    assert!(destination.preallocated);
    assert!(destination.prealloc_ms > 0.0);
    assert!(
        resident(&dst.memory, unsent),
        "an unsent page was not preallocated"
    );
    assert_eq!(destination.populated_pages, 0);
}

/// What the lying channel's proxy saw of the source's packets.
#[derive(Default)]
struct ChannelSeen {
    index: u16,
    generation: u32,
    packet: u64,
    last_was_sync: bool,
    at: Option<std::time::Instant>,
}

/// A connection to the destination at `addr` (host:port) through a
/// proxy: the source's end, and the proxy's sides facing the source and
/// the destination.
fn through_proxy(addr: &str) -> (Connection, std::net::TcpStream, std::net::TcpStream) {
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a proxy");
    let proxy_uri: MigrationUri = format!("tcp:{}", proxy.local_addr().unwrap())
        .parse()
        .unwrap();
    let src_side = Connection::connect(&proxy_uri).expect("connect to the proxy");
    let (inner, _) = proxy.accept().expect("accept at the proxy");
    let outer = std::net::TcpStream::connect(addr).expect("connect onward");
    (src_side, inner, outer)
}

/// A channel to the destination at `addr` through a proxy that forwards
/// it as [`forward_channel`] does (flipping a byte with `flip`) and copies
/// the destination's side back: the source's end, the proxy's stream to
/// the destination (for a forged packet) and what it saw go by.
fn proxied_channel(
    addr: &str,
    flip: Option<Arc<std::sync::Mutex<Option<u64>>>>,
) -> (
    Connection,
    Arc<std::sync::Mutex<std::net::TcpStream>>,
    Arc<std::sync::Mutex<ChannelSeen>>,
) {
    let (channel, ch_in, ch_out) = through_proxy(addr);
    let seen = Arc::new(std::sync::Mutex::new(ChannelSeen::default()));
    let ch_out = Arc::new(std::sync::Mutex::new(ch_out));
    let back = ch_out.lock().unwrap().try_clone().unwrap();
    std::thread::spawn({
        let inner = ch_in.try_clone().unwrap();
        move || support::copy_through(back, inner)
    });
    std::thread::spawn({
        let (ch_out, seen) = (Arc::clone(&ch_out), Arc::clone(&seen));
        move || forward_channel(ch_in, ch_out, seen, flip)
    });
    (channel, ch_out, seen)
}

/// Forwards a channel's packets whole (so a forged one never lands inside
/// another), booking the last one's generation and number. With `flip`,
/// the first byte of the first page of block 0 it forwards that no vCPU
/// writes is flipped, and `flip` holds that page's index.
fn forward_channel(
    mut from: std::net::TcpStream,
    to: Arc<std::sync::Mutex<std::net::TcpStream>>,
    seen: Arc<std::sync::Mutex<ChannelSeen>>,
    flip: Option<Arc<std::sync::Mutex<Option<u64>>>>,
) {
    use livemig_core::wire::{
        ChannelHello, HELLO_LEN, PACKET_HEADER_LEN, PacketEntries, PacketHeader, PacketKind,
        PageKind,
    };
    use std::io::{Read, Write};
    let mut hello = [0u8; HELLO_LEN];
    if from.read_exact(&mut hello).is_err() {
        return;
    }
    seen.lock().unwrap().index = ChannelHello::decode(&hello).expect("a channel hello").index;
    to.lock()
        .unwrap()
        .write_all(&hello)
        .expect("forward the hello");
    loop {
        let mut packet = vec![0u8; PACKET_HEADER_LEN];
        if from.read_exact(&mut packet).is_err() {
            break;
        }
        let header = PacketHeader::decode(&packet).expect("a packet header");
        let mut entries = vec![0u8; header.entries_len()];
        from.read_exact(&mut entries).expect("the entry table");
        let table = PacketEntries::decode(&header, &entries).expect("an entry table");
        let page = match header.kind {
            PacketKind::Pages { page_shift, .. } => 1usize << page_shift,
            PacketKind::Sync => 0,
        };
        let mut data = vec![0u8; table.normal() * page];
        from.read_exact(&mut data).expect("the pages");
        if let (Some(flip), PacketKind::Pages { block: 0, .. }) = (&flip, header.kind) {
            let mut flipped = flip.lock().unwrap();
            let written = (0..VCPUS).map(|v| support::counter_gpa(v) / 4096);
            let normal = table.iter().filter(|e| e.kind == PageKind::Normal);
            if flipped.is_none()
                && let Some((at, e)) = normal
                    .enumerate()
                    .find(|(_, e)| written.clone().all(|w| w != e.index))
            {
                data[at * page] ^= 0x01;
                *flipped = Some(e.index);
            }
        }
        packet.extend_from_slice(&entries);
        packet.extend_from_slice(&data);
        to.lock()
            .unwrap()
            .write_all(&packet)
            .expect("forward a packet");
        let mut s = seen.lock().unwrap();
        s.generation = header.generation;
        s.packet = header.packet;
        s.last_was_sync = header.kind == PacketKind::Sync;
        s.at = Some(std::time::Instant::now());
    }
    let _ = to.lock().unwrap().shutdown(std::net::Shutdown::Write);
}

/// Forwards the main stream record by record; before the Digest record
/// (after the last pass's pages and the final flush) it has `forge` write
/// its packet on the channel, once the channel has been quiet after a
/// sync, and gives it time to arrive.
fn forward_main(from: std::net::TcpStream, to: std::net::TcpStream, forge: impl FnOnce()) {
    let mut forge = Some(forge);
    support::forward_records(from, to, |kind, _| {
        if kind == livemig_core::wire::kind::DIGEST
            && let Some(forge) = forge.take()
        {
            forge();
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// A peer that lies on a channel: after the last pass's sync, a packet in
/// sequence (the next generation, the next number) carries a page with
/// other contents. Every channel check passes it; the seal at the digest
/// does not: the destination refuses, never starts its guest, and the
/// source guest runs on.
#[test]
fn a_channel_packet_after_the_last_sync_is_refused_and_the_source_guest_runs_on() {
    if !kvm_available() {
        return;
    }
    use livemig_core::wire::{PacketHeader, PacketKind, PageEntry, PageKind};
    use std::io::Write;
    let src = running_source();
    let dst = TestVm::new(VCPUS, false, |_| {});
    let (listener, uri) = listen();
    let dest_addr = uri.to_string();
    let dest_addr = dest_addr.trim_start_matches("tcp:").to_string();
    let incoming = destination(&dst, listener, false);
    // The main connection and channel 1 through proxies, channel 0 direct,
    // each accepted by the destination in the order the source connects.
    let (main, main_in, main_out) = through_proxy(&dest_addr);
    let channel0 = Connection::connect(&uri).expect("connect channel 0");
    let (channel1, ch_out, seen) = proxied_channel(&dest_addr, None);
    let forged = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forge = {
        let (ch_out, seen, forged) = (Arc::clone(&ch_out), Arc::clone(&seen), Arc::clone(&forged));
        move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let (index, generation, packet) = loop {
                {
                    let s = seen.lock().unwrap();
                    if s.last_was_sync
                        && s.at
                            .is_some_and(|t| t.elapsed() > Duration::from_millis(50))
                    {
                        break (s.index, s.generation, s.packet);
                    }
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the channel never went quiet"
                );
                std::thread::sleep(Duration::from_millis(5));
            };
            let header = PacketHeader {
                channel: index,
                generation: generation + 1,
                packet: packet + 1,
                kind: PacketKind::Pages {
                    block: 0,
                    page_shift: 12,
                    count: 1,
                },
            };
            // Page 64 (0x40000): non-zero on the source, 0xee here.
            let entry = PageEntry {
                index: 64,
                kind: PageKind::Normal,
            };
            let mut bytes = vec![0u8; 64];
            let n = header
                .encode(&[entry], &mut bytes)
                .expect("a forged packet");
            bytes.truncate(n);
            bytes.extend_from_slice(&[0xee; 4096]);
            ch_out
                .lock()
                .unwrap()
                .write_all(&bytes)
                .expect("send the forged packet");
            forged.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    };
    let back = main_out.try_clone().unwrap();
    std::thread::spawn({
        let inner = main_in.try_clone().unwrap();
        move || support::copy_through(back, inner)
    });
    std::thread::spawn(move || forward_main(main_in, main_out, forge));

    let source = migrate_with_channels(
        source_vm(&src),
        main,
        vec![channel0, channel1],
        &config(),
        SourceOptions::default(),
    )
    .expect("migrate")
    .join()
    .expect("source report");
    let destination = incoming.join().expect("destination thread");
    assert!(
        forged.load(std::sync::atomic::Ordering::SeqCst),
        "the forged packet was never sent"
    );
    let error = destination.error.as_ref().map(|e| e.to_string());
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("multifd channel 1")),
        "the destination did not name the channel: {error:?}"
    );
    assert_ne!(source.stats.status, MigrationStatus::Completed);
    assert_source_runs_on(&src, &dst, &destination);
}

/// A byte flipped in a page on a channel, past TCP's checks: the digest at
/// the end differs, the destination locates the page (the engine's books
/// adopt the receivers' terms for it) and names it on both ends, never
/// starts its guest, and the source guest runs on.
#[test]
fn a_page_flipped_on_a_channel_is_named_and_the_source_guest_runs_on() {
    if !kvm_available() {
        return;
    }
    let src = running_source();
    let dst = TestVm::new(VCPUS, false, |_| {});
    let (listener, uri) = listen();
    let dest_addr = uri.to_string();
    let dest_addr = dest_addr.trim_start_matches("tcp:").to_string();
    let incoming = destination(&dst, listener, false);
    // The main connection and channel 0 direct, channel 1 through the
    // flipping proxy, in the order the destination accepts them.
    let main = Connection::connect(&uri).expect("connect the main stream");
    let channel0 = Connection::connect(&uri).expect("connect channel 0");
    let flipped = Arc::new(std::sync::Mutex::new(None));
    let (channel1, _, _) = proxied_channel(&dest_addr, Some(Arc::clone(&flipped)));

    let source = migrate_with_channels(
        source_vm(&src),
        main,
        vec![channel0, channel1],
        &config(),
        SourceOptions::default(),
    )
    .expect("migrate")
    .join()
    .expect("source report");
    let destination = incoming.join().expect("destination thread");
    let page = flipped.lock().unwrap().expect("no page was flipped");
    let named = Verification::Mismatch {
        block: 0,
        page: Some(page),
    };
    assert_eq!(
        destination.stats.verification, named,
        "{}",
        destination.stats.error_desc
    );
    assert_eq!(
        source.stats.verification, named,
        "{}",
        source.stats.error_desc
    );
    assert_ne!(source.stats.status, MigrationStatus::Completed);
    assert_source_runs_on(&src, &dst, &destination);
}
