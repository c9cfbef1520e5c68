//! Multifd in simulated time: pages over several channels, each its own
//! link, with a sync per pass. Normal migrations complete with memory equal
//! byte for byte; one channel cut at a random byte in every phase (setup,
//! first pass, later passes, the stop) fails the migration cleanly with the
//! source guest intact; a stalled channel, a stray connection and a
//! destination without channels fail cleanly too. Postcopy after a
//! multifd precopy (switched after a pass or in the middle of one, with
//! and without the preempt channel, cut and recovered) verifies, and a
//! channel cut before the switch fails cleanly.

use livemig_core::capabilities::Capabilities;
use livemig_core::status::MigrationStatus;
use livemig_sim::{InjectedFault, LinkConfig, Outcome, Scenario, SimChannels, run_migration};
use livemig_tests::{assert_source_kept_guest, assert_verified, dirtying, guest_gib, link};

/// A 1 GiB guest dirtying 8 MiB, with the return path, over `channels`
/// channels of 200 MB/s each (the main link the same).
fn scenario(channels: u8) -> Scenario {
    let mut s = guest_gib(1);
    s.guest = Some(dirtying(8, 3_000, 33));
    s.config.capabilities |= Capabilities::RETURN_PATH | Capabilities::MULTIFD;
    s.config.parameters.multifd_channels = channels;
    s.config.parameters.max_bandwidth = 0;
    s.forward = link(200_000_000);
    s
}

/// A channel's link as the scenarios get by default: the main link's
/// shape with the shim's send queue.
fn channel_link() -> LinkConfig {
    LinkConfig {
        send_buffer_bytes: SimChannels::SEND_BUFFER,
        ..link(200_000_000)
    }
}

/// Tiny deterministic generator for cut offsets.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn assert_failed_cleanly(o: &Outcome, what: &str) {
    assert_eq!(
        o.source.status,
        MigrationStatus::Failed,
        "{what}: source '{}', destination '{}'",
        o.source.error_desc,
        o.destination.error_desc
    );
    assert_source_kept_guest(o);
    assert!(!o.destination_running, "{what}: destination runs the guest");
}

/// The never-populated rest of RAM went as zero runs on the main stream:
/// the channels carried the normal pages with their entries and headers,
/// not an 8-byte entry for each of those (without the runs they carry 1
/// MiB of entries more per channel, and this fails).
fn assert_unpopulated_pages_went_as_runs(o: &Outcome, what: &str) {
    let unpopulated = o.source.ram.unpopulated;
    assert!(
        unpopulated > 200_000,
        "{what}: {unpopulated} pages never populated"
    );
    let carried: u64 = o.channel_bytes.iter().sum();
    let pages = o.source.ram.normal * (4096 + 8);
    assert!(
        carried < pages + unpopulated * 8 / 4,
        "{what}: {carried} bytes on the channels for {} normal pages",
        o.source.ram.normal
    );
}

#[test]
fn migrations_over_one_two_and_four_channels_complete_with_memory_equal() {
    for channels in [1, 2, 4] {
        let o = run_migration(&scenario(channels)).expect("scenario");
        assert_verified(&o);
        assert!(o.memory_identical, "{channels} channels: memory differs");
        assert_eq!(o.channel_bytes.len(), usize::from(channels));
        // Every channel carried pages, the main stream almost none: a
        // 1 GiB guest's first pass alone is 4 MiB of fill per channel.
        for (i, &bytes) in o.channel_bytes.iter().enumerate() {
            assert!(bytes > 1 << 20, "channel {i} carried {bytes} bytes");
        }
        assert!(o.bytes_sent < 1 << 20, "main stream {} bytes", o.bytes_sent);
        // Both ends counted the same pages: what the channels placed.
        assert_eq!(o.source.ram.normal, o.destination.ram.normal);
        assert_eq!(o.source.ram.duplicate, o.destination.ram.duplicate);
        assert!(o.destination.ram.multifd_bytes > 0);
        assert_unpopulated_pages_went_as_runs(&o, &format!("{channels} channels"));
        // A sync per pass: as many flushes as the destination counted
        // passes.
        assert_eq!(o.source.iterations, o.destination.iterations);
    }
}

#[test]
fn a_postcopy_capable_multifd_precopy_sends_never_populated_pages_as_runs() {
    // The capability alone: the migration converges and never switches.
    let mut s = scenario(2);
    s.config.capabilities |= Capabilities::POSTCOPY_RAM;
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    assert!(o.postcopy.is_none(), "the guest ran in postcopy");
    assert_unpopulated_pages_went_as_runs(&o, "postcopy-ram on");
}

#[test]
fn more_channels_move_the_first_pass_faster() {
    // One 200 MB/s link per channel: the payload rate scales with them.
    let mut one = scenario(1);
    one.guest = None;
    one.fill_pages = 1 << 16;
    let mut two = one.clone();
    two.config.parameters.multifd_channels = 2;
    let (a, b) = (run_migration(&one).unwrap(), run_migration(&two).unwrap());
    assert_verified(&a);
    assert_verified(&b);
    let ratio = a.end_ns as f64 / b.end_ns as f64;
    assert!(
        ratio > 1.8,
        "2 channels only {ratio:.2}x faster than 1 ({} ns, {} ns)",
        a.end_ns,
        b.end_ns
    );
}

#[test]
fn a_channel_cut_at_a_random_byte_in_every_phase_fails_cleanly() {
    let clean = run_migration(&scenario(2)).expect("scenario");
    assert_verified(&clean);
    let victim = 1;
    let first_pass = clean
        .channel_bytes_after_first_pass
        .as_ref()
        .expect("a pass")[victim];
    let at_stop = clean.channel_bytes_at_stop.as_ref().expect("stopped")[victim];
    let total = clean.channel_bytes[victim];
    assert!(24 < first_pass && first_pass < at_stop && at_stop < total);
    // The hello, the first pass, the later passes, the stop-and-copy.
    let phases = [
        (0, 24),
        (24, first_pass),
        (first_pass, at_stop),
        (at_stop, total),
    ];
    let mut rng = 0x6d75_6c74;
    for (phase, &(from, to)) in phases.iter().enumerate() {
        for _ in 0..4 {
            let cut = from + splitmix(&mut rng) % (to - from);
            let mut s = scenario(2);
            let mut faulty = channel_link();
            faulty.cut_after = Some(cut);
            s.channel_links = vec![channel_link(), faulty];
            let o = run_migration(&s).expect("scenario");
            assert_failed_cleanly(&o, &format!("phase {phase}, cut at {cut}"));
            assert_eq!(o.destination.status, MigrationStatus::Failed);
        }
    }
}

#[test]
fn a_silent_channel_fails_at_the_next_sync() {
    let mut s = scenario(2);
    let mut stalled = channel_link();
    stalled.stall_after = Some(1 << 20);
    s.channel_links = vec![channel_link(), stalled];
    let o = run_migration(&s).expect("scenario");
    assert_failed_cleanly(&o, "stalled channel");
    assert!(
        o.destination
            .error_desc
            .as_str()
            .contains("did not reach its sync"),
        "{}",
        o.destination.error_desc
    );
}

#[test]
fn a_corrupt_packet_is_refused() {
    // A flipped byte in the middle of the first packet header's block
    // field, then one in the page data (the digest must catch that one:
    // page data is not checksummed, as in QEMU).
    let mut s = scenario(2);
    let mut bad = channel_link();
    bad.corrupt_at = Some((24 + 24, 0x40));
    s.channel_links = vec![channel_link(), bad];
    let o = run_migration(&s).expect("scenario");
    assert_failed_cleanly(&o, "corrupt block index");
    assert!(
        o.destination.error_desc.as_str().contains("channel 1"),
        "{}",
        o.destination.error_desc
    );
}

/// A 1 GiB guest over two channels keeping 64 MiB dirty far faster than
/// the links carry, switched to postcopy after one pass. 16 MiB of data
/// besides the working set make the first pass long enough (40 ms) for the
/// guest to dirty most of the working set, so that its destination faults
/// on pages the background pass has yet to send: the rest of RAM, never
/// populated, goes in a few zero runs, and with the working set alone the
/// pass took 5 ms, its 414 dirty pages went before the guest touched one.
fn postcopy_scenario() -> Scenario {
    let mut s = scenario(2);
    s.guest = Some(dirtying(64, 300_000, 31));
    s.config.capabilities |= Capabilities::POSTCOPY_RAM;
    s.config.limits.postcopy_after_iterations = Some(1);
    s.fill_pages = 16 * 256;
    s
}

#[test]
fn postcopy_after_a_multifd_precopy_completes_with_memory_equal() {
    // After a whole pass; asked for by the operator in the middle of the
    // first pass (the channels hold pages of an unfinished pass: they must
    // land before the discards); with the preempt channel.
    for (what, mid_pass, preempt) in [
        ("after a pass", false, false),
        ("mid-pass", true, false),
        ("mid-pass with preempt", true, true),
    ] {
        let mut s = postcopy_scenario();
        if mid_pass {
            // 64 MiB of data (the first pass takes 0.17 s at 2 x 200
            // MB/s), and a gentler guest: simulating 300 000 faults a
            // second on the destination is what takes the time here.
            s.config.limits.postcopy_after_iterations = None;
            s.fill_pages = 64 * 256;
            s.guest = Some(dirtying(8, 3_000, 33));
            s.start_postcopy_at_ns = Some(60_000_000);
        }
        if preempt {
            s.config.capabilities |= Capabilities::POSTCOPY_PREEMPT;
        }
        let o = run_migration(&s).expect("scenario");
        // Passes, the one postcopy finishes included.
        assert_eq!(o.source.iterations, 2 - u64::from(mid_pass), "{what}");
        assert_verified(&o);
        let pc = o.postcopy.as_ref().expect("the guest ran in postcopy");
        assert!(pc.discarded_pages > 0, "{what}: {pc:?}");
        assert!(mid_pass || pc.requests > 0, "{what}: {pc:?}");
        // The first pass went on the channels; after the switch they
        // carried nothing (the postcopy pass and its requests went on the
        // main stream and the preempt channel).
        let at_stop = o.channel_bytes_at_stop.clone().expect("stopped");
        assert_eq!(at_stop, o.channel_bytes, "{what}");
        for (i, &bytes) in o.channel_bytes.iter().enumerate() {
            assert!(bytes > 1 << 20, "channel {i} carried {bytes} bytes");
        }
        assert!(o.bytes_sent > 1 << 20, "main stream {} bytes", o.bytes_sent);
    }
}

#[test]
fn a_channel_cut_before_the_switch_to_postcopy_fails_cleanly() {
    let clean = run_migration(&postcopy_scenario()).expect("scenario");
    assert_verified(&clean);
    let victim = 0;
    let first_pass = clean
        .channel_bytes_after_first_pass
        .as_ref()
        .expect("a pass")[victim];
    let total = clean.channel_bytes[victim];
    assert!(
        24 < first_pass && first_pass < total,
        "{first_pass} {total}"
    );
    // The hello, the first pass, the switch's sync (the channels carry
    // nothing after it).
    let phases = [(0, 24), (24, first_pass), (first_pass, total)];
    let mut rng = 0x7063_6d66;
    for (phase, &(from, to)) in phases.iter().enumerate() {
        for _ in 0..2 {
            let cut = from + splitmix(&mut rng) % (to - from);
            let mut s = postcopy_scenario();
            let mut faulty = channel_link();
            faulty.cut_after = Some(cut);
            s.channel_links = vec![faulty, channel_link()];
            let o = run_migration(&s).expect("scenario");
            let what = format!("phase {phase}, cut at {cut}");
            assert_failed_cleanly(&o, &what);
            assert!(o.postcopy.is_none(), "{what}: the guest ran in postcopy");
        }
    }
}

#[test]
fn a_cut_postcopy_after_a_multifd_precopy_recovers_without_resending_the_channels_pages() {
    let clean = run_migration(&postcopy_scenario()).expect("scenario");
    assert_verified(&clean);
    let at_stop = clean.bytes_at_stop.expect("stopped");
    let mut s = postcopy_scenario();
    s.forward.cut_after = Some(at_stop + 200_000);
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    assert_eq!(o.source.postcopy_recoveries, 1);
    // The recovery's received bitmaps have the pages the channels placed:
    // the source re-sends what the cut lost, not the channels' pages
    // (measured: 30.5 MB on the main stream cut, 30.7 MB not; 47.0 MB if
    // the destination forgets them).
    assert!(
        o.bytes_sent < clean.bytes_sent + clean.bytes_sent / 4,
        "main stream {} bytes after a cut, {} without",
        o.bytes_sent,
        clean.bytes_sent
    );
}

#[test]
fn pages_a_channel_sends_after_the_last_sync_fail_the_migration_cleanly() {
    // In sequence, so the channel's own checks pass them; only the seal
    // at the digest sees pages no flush counted. Without it the migration
    // completed, both digests agreeing, over a page that differs.
    let mut s = scenario(2);
    s.fault = Some(InjectedFault::ChannelPagesAfterLastSync);
    let o = run_migration(&s).expect("scenario");
    assert!(o.fault_injected, "the packet went out");
    assert_failed_cleanly(&o, "pages after the last sync");
    assert!(
        o.destination
            .error_desc
            .as_str()
            .contains("channel 0 carried bytes after its last sync"),
        "{}",
        o.destination.error_desc
    );
}
