//! Issue 12: a postcopy whose connection is cut after the switchover
//! pauses, recovers over a new connection, and completes with the memory
//! verified byte for byte (the in-protocol digest of every page against
//! the source's books) and the guest running on at the destination.
//!
//! The cuts are real: a relay between `send` and `receive` shuts its TCP
//! sockets down (mid-postcopy, and during the recovery handshake), `demo
//! --cut-after-ms` shuts its own connection down, and a veth link between
//! two network namespaces goes down for two seconds.

#[allow(dead_code)]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Output};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{
    Netns, SWITCHOVER_LINE, StderrLines, assert_each_vcpu_went_on, demo, events, finish, json_of,
    kvm_available, spawn, spawn_receiver_with, stderr, userfaultfd_available,
};

/// Flags of a postcopy `send` whose background pass is held to 16 MiB/s
/// over a 64 MiB working set: the guest runs on the destination for a few
/// seconds while the rest of its memory arrives, time for a cut.
const SLOW_POSTCOPY: &[&str] = &[
    "--mode",
    "postcopy",
    "--json",
    "--quiet",
    "--mem-mib",
    "256",
    "--dirty-mib",
    "64",
    "--warmup-ms",
    "300",
    "--param",
    "max-postcopy-bandwidth=16M",
];

/// The preempt channel with a background pass held to half the other
/// tests' rate, so the guest still finds pages missing after a recovery
/// when this binary's other guests share the cores (in CI one such run
/// made 4 requests in all, none after).
const PREEMPT_SLOWER: &[&str] = &[
    "--cap",
    "postcopy-preempt=on",
    "--param",
    "max-postcopy-bandwidth=8M",
];

/// A TCP relay between `send` and `receive`, whose sockets the test shuts
/// down: each connection the source makes is relayed over a connection of
/// its own to the receiver.
struct Relay {
    /// Where the source connects: `tcp:127.0.0.1:PORT`.
    addr: String,
    /// Each relayed connection: (the source's end, the receiver's end).
    conns: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
}

/// Where the relay cuts a connection by itself: at the first bytes one
/// side sends on it, which are not relayed (both ends are shut down).
#[derive(Clone, Copy, PartialEq)]
enum Cut {
    /// Relayed connection `n`, at the receiver's first reply.
    AtReply(usize),
    /// Relayed connection `n`, at the source's first bytes.
    AtSend(usize),
}

impl Relay {
    /// Relays to `to` (`tcp:HOST:PORT`), cutting the connections `cuts`
    /// names where they say.
    fn start(to: &str, cuts: &'static [Cut]) -> Relay {
        let target = to.strip_prefix("tcp:").expect("a tcp address").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("tcp:{}", listener.local_addr().unwrap());
        let conns = Arc::new(Mutex::new(Vec::new()));
        let theirs = Arc::clone(&conns);
        thread::spawn(move || {
            for (index, src) in listener.incoming().enumerate() {
                let Ok(src) = src else { return };
                let Ok(dst) = TcpStream::connect(&target) else {
                    return;
                };
                theirs
                    .lock()
                    .unwrap()
                    .push((src.try_clone().unwrap(), dst.try_clone().unwrap()));
                let send_cut = cuts.contains(&Cut::AtSend(index));
                let reply_cut = cuts.contains(&Cut::AtReply(index));
                pump(
                    src.try_clone().unwrap(),
                    dst.try_clone().unwrap(),
                    send_cut.then_some((index, "the source's first bytes")),
                );
                pump(
                    dst,
                    src,
                    reply_cut.then_some((index, "the receiver's first reply")),
                );
            }
        });
        Relay { addr, conns }
    }

    /// Shuts relayed connection `index` down, both ends: each side sees
    /// its connection end.
    fn cut(&self, index: usize) {
        let conns = self.conns.lock().unwrap();
        let (a, b) = &conns[index];
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    }

    /// Connections the source made so far.
    fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }
}

/// Copies `from` to `to` on a thread until either ends; with `cut_first`
/// (the connection's index and what its first bytes are), the first bytes
/// read shut both sockets down instead.
fn pump(mut from: TcpStream, mut to: TcpStream, cut_first: Option<(usize, &'static str)>) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some((index, at)) = cut_first {
                eprintln!("relay: cutting connection {index} at {at}");
                break;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// Both ends completed a postcopy that recovered `at_least` times, with
/// the memory verified and the guest running on at the destination.
fn assert_recovered_and_verified(send: &Output, recv: &Output, at_least: u64) {
    let (s, r) = (json_of(send), json_of(recv));
    assert!(send.status.success(), "send failed: {}\n{s}", stderr(send));
    assert!(
        recv.status.success(),
        "receive failed: {}\n{r}",
        stderr(recv)
    );
    for (side, v) in [("send", &s), ("receive", &r)] {
        assert_eq!(v["status"], "completed", "{side}: {v}");
        assert_eq!(v["verified"], true, "{side}: {v}");
        assert!(
            v["postcopy-recoveries"].as_u64() >= Some(at_least),
            "{side}: fewer than {at_least} recoveries: {v}"
        );
    }
    assert_eq!(s["postcopy"], true, "{s}");
    assert_eq!(r["guest-stamps"]["wrong"], 0, "{r}");
    assert_eq!(r["guest-mismatches"].as_array().unwrap().len(), 0, "{r}");
    assert_each_vcpu_went_on(&s, &r);
    for (side, out) in [("send", send), ("receive", recv)] {
        assert!(
            stderr(out).contains("postcopy paused"),
            "{side} did not say it paused: {}",
            stderr(out)
        );
        assert!(
            events(out, "postcopy-paused").len() as u64 >= at_least,
            "{side}: no postcopy-paused event"
        );
        assert!(
            events(out, "recovered").len() as u64 >= at_least,
            "{side}: no recovered event"
        );
    }
}

/// A `send` through `relay` with the slow postcopy, and its stderr.
fn spawn_sender(relay: &Relay, extra: &[&str]) -> (Child, StderrLines) {
    let mut args = vec!["send", "--to", &relay.addr];
    args.extend_from_slice(SLOW_POSTCOPY);
    args.extend_from_slice(extra);
    let mut sender = spawn(&args);
    let lines = StderrLines::of(&mut sender);
    (sender, lines)
}

/// A sender with `sender_extra` whose main connection (the relay's first)
/// is cut 400 ms into postcopy, through a relay that also makes `cuts`: it
/// recovers, completes and verifies. Returns what the sender and the
/// receiver printed, and the connections the relay took.
fn cut_mid_postcopy(cuts: &'static [Cut], sender_extra: &[&str]) -> (Output, Output, usize) {
    cut_mid_postcopy_resuming(cuts, sender_extra, None)
}

/// [`cut_mid_postcopy`] whose sender, when `resume_via` is given, resumes
/// at the address it makes from the receiver's (`--resume-to`) instead of
/// through the relay.
fn cut_mid_postcopy_resuming(
    cuts: &'static [Cut],
    sender_extra: &[&str],
    resume_via: Option<fn(&str) -> String>,
) -> (Output, Output, usize) {
    let (receiver, addr) =
        spawn_receiver_with("tcp:127.0.0.1:0", 256, &["--recover-timeout-s", "60"]);
    let relay = Relay::start(&addr, cuts);
    let resume_to = resume_via.map(|via| via(&addr));
    let mut extra = vec!["--recover-timeout-s", "60"];
    if let Some(to) = &resume_to {
        extra.extend_from_slice(&["--resume-to", to]);
    }
    extra.extend_from_slice(sender_extra);
    let (sender, mut lines) = spawn_sender(&relay, &extra);
    lines.wait_for(SWITCHOVER_LINE);
    thread::sleep(Duration::from_millis(400));
    relay.cut(0);
    let send = lines.finish(sender);
    let recv = finish(receiver);
    assert_recovered_and_verified(&send, &recv, 1);
    (send, recv, relay.connections())
}

#[test]
fn a_connection_cut_mid_postcopy_pauses_recovers_and_verifies() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    let (_, _, connections) = cut_mid_postcopy(&[], &[]);
    assert!(connections >= 2, "the source connected again");
}

/// Issue 12, item 4: with the preempt channel, a cut of the main
/// connection mid-postcopy takes the channel down too; the recovery opens
/// a new one (the relay's fourth connection, after the new main one) and
/// requested pages come over it again: the receiver counts pages the new
/// channel brought first, after the last recovery began.
#[test]
fn a_recovery_opens_the_preempt_channel_again() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    // Connection 0 is the main one, 1 the preempt channel.
    let (_, recv, connections) = cut_mid_postcopy(&[], PREEMPT_SLOWER);
    let r = json_of(&recv);
    assert!(
        connections >= 4,
        "a new main connection and a new preempt channel: {connections}"
    );
    assert!(
        r["postcopy-preempt-pages"].as_u64() > Some(0),
        "no page came over the reopened preempt channel: {r}"
    );
    assert!(r["ram"]["postcopy-requests"].as_u64() > Some(0), "{r}");
}

/// The preempt channel a recovery opened is cut at its first bytes (its
/// hello, before any page): the destination pauses again, mid-handshake,
/// as for a cut of the main connection, and the next recovery opens a
/// third channel, over which the migration completes.
#[test]
fn a_cut_of_the_reopened_preempt_channel_pauses_again_and_recovers() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    // Connections 0 and 1: main and preempt; 2 and 3: the first
    // recovery's; 4 and 5: the second's.
    let (send, recv, connections) = cut_mid_postcopy(&[Cut::AtSend(3)], PREEMPT_SLOWER);
    assert!(
        connections >= 6,
        "two new main connections and two new preempt channels: {connections}"
    );
    for (side, out) in [("send", &send), ("receive", &recv)] {
        assert!(
            events(out, "postcopy-paused").len() >= 2,
            "{side} did not pause at the channel's cut: {}",
            stderr(out)
        );
    }
    assert!(
        stderr(&recv).contains("the source closed the postcopy preempt channel"),
        "the receiver did not name the channel: {}",
        stderr(&recv)
    );
    let r = json_of(&recv);
    assert!(
        r["postcopy-preempt-pages"].as_u64() > Some(0),
        "no page came over the third preempt channel: {r}"
    );
}

/// A listener for a recovery that relays the first connection to `to` and
/// refuses every later one: it accepts nothing until a connection is
/// queued, waits, then takes that one and closes. With an accept queue of
/// one (`listen` backlog 0) the connection the source opens right after
/// the first one (the new preempt channel) finds the queue full, its SYN
/// is dropped, and its retransmission a second later meets a closed port:
/// no race between the source's two connects and the close.
fn one_connection_relay(to: &str) -> String {
    use std::os::fd::AsRawFd;
    let target = to.strip_prefix("tcp:").expect("a tcp address").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: `listen` on a socket this test owns; Linux takes a second
    // `listen` on a listening socket as a new backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    thread::spawn(move || {
        let mut queued = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on a live socket, no timeout.
        if unsafe { libc::poll(&mut queued, 1, -1) } != 1 {
            return;
        }
        // Time for the next connect's SYN to arrive and be dropped.
        thread::sleep(Duration::from_millis(300));
        let Ok((src, _)) = listener.accept() else {
            return;
        };
        drop(listener);
        let Ok(dst) = TcpStream::connect(&target) else {
            return;
        };
        pump(src.try_clone().unwrap(), dst.try_clone().unwrap(), None);
        pump(dst, src, None);
    });
    addr
}

/// Issue 12, item 4: a recovery whose new preempt channel cannot be
/// connected goes on without one (requested pages take the main stream),
/// says so, and completes verified.
#[test]
fn a_recovery_whose_preempt_channel_is_refused_goes_on_over_the_main_stream() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    let (send, _, _) = cut_mid_postcopy_resuming(&[], PREEMPT_SLOWER, Some(one_connection_relay));
    let refused = events(&send, "preempt-not-reopened");
    assert_eq!(refused.len(), 1, "{}", stderr(&send));
    assert!(
        refused[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("refused")),
        "{}",
        refused[0]
    );
    assert!(
        stderr(&send).contains("postcopy recovery without a preempt channel"),
        "{}",
        stderr(&send)
    );
}

#[test]
fn a_cut_during_the_recovery_handshake_pauses_again_and_recovers() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    let (receiver, addr) =
        spawn_receiver_with("tcp:127.0.0.1:0", 256, &["--recover-timeout-s", "60"]);
    // The first recovery connection is cut when the receiver answers the
    // source's first bitmap request: in the middle of the handshake.
    let relay = Relay::start(&addr, &[Cut::AtReply(1)]);
    let (sender, mut lines) = spawn_sender(
        &relay,
        &["--recover-timeout-s", "60", "--resume-to", &relay.addr],
    );
    lines.wait_for(SWITCHOVER_LINE);
    thread::sleep(Duration::from_millis(400));
    relay.cut(0);
    let send = lines.finish(sender);
    let recv = finish(receiver);
    assert_recovered_and_verified(&send, &recv, 1);
    assert!(relay.connections() >= 3, "a second recovery connection");
    assert!(
        events(&send, "recovery-started").len() >= 2,
        "the source started two recoveries: {}",
        String::from_utf8_lossy(&send.stdout)
    );
    assert!(
        events(&send, "postcopy-paused").len() >= 2,
        "the handshake's cut paused the source again"
    );
}

/// How often `needle` occurs in what a run printed on stderr.
fn stderr_count(out: &Output, needle: &str) -> usize {
    stderr(out).matches(needle).count()
}

#[test]
fn a_recovery_given_up_says_where_the_pages_are_once_on_each_side() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    // Nothing listens where the source is to reconnect (a port bound and
    // released), and both sides give up after a second.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("tcp:{}", dead.local_addr().unwrap());
    drop(dead);
    let (receiver, addr) =
        spawn_receiver_with("tcp:127.0.0.1:0", 256, &["--recover-timeout-s", "1"]);
    let relay = Relay::start(&addr, &[]);
    let (sender, mut lines) = spawn_sender(
        &relay,
        &["--recover-timeout-s", "1", "--resume-to", &nowhere],
    );
    lines.wait_for(SWITCHOVER_LINE);
    thread::sleep(Duration::from_millis(400));
    relay.cut(0);
    let send = lines.finish(sender);
    let recv = finish(receiver);
    for (side, out, pages) in [
        ("send", &send, "the guest was handed to the destination"),
        ("receive", &recv, "the guest ran here with"),
    ] {
        assert!(!out.status.success(), "{side} succeeded: {}", stderr(out));
        assert_eq!(json_of(out)["status"], "failed", "{side}");
        // The event's line says why, the failure line where the pages
        // are: each sentence once.
        assert_eq!(
            stderr_count(out, pages),
            1,
            "{side}: where the pages are, said other than once: {}",
            stderr(out)
        );
        assert_eq!(
            stderr_count(out, "postcopy recovery given up: "),
            1,
            "{side}: {}",
            stderr(out)
        );
        let given_up = events(out, "recovery-abandoned");
        assert_eq!(given_up.len(), 1, "{side}: {given_up:?}");
        assert!(
            given_up[0]["pages"]
                .as_str()
                .is_some_and(|p| p.contains(pages)),
            "{side}: {given_up:?}"
        );
        assert!(given_up[0]["reason"].is_string(), "{side}: {given_up:?}");
    }
}

#[test]
fn demo_cut_after_the_switchover_recovers_and_verifies() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    let out = demo(&["--mode", "postcopy", "--cut-after-ms", "200"]);
    let v = json_of(&out);
    assert!(out.status.success(), "{}\n{v}", stderr(&out));
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert!(
        v["postcopy-recoveries"].as_u64() >= Some(1),
        "no recovery counted: {v}"
    );
    let d = &v["destination"];
    assert_eq!(d["status"], "completed", "{v}");
    assert_eq!(d["verified"], true, "{v}");
    assert!(d["postcopy-recoveries"].as_u64() >= Some(1), "{v}");
    assert_eq!(d["guest-started"], true, "{v}");
    assert_eq!(d["guest-stamps"]["wrong"], 0, "{v}");
    assert_eq!(d["guest-mismatches"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["guest-continued"], true, "{v}");
}

#[test]
fn cut_after_ms_needs_postcopy() {
    let out = common::livemig(&["demo", "--cut-after-ms", "200"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--cut-after-ms needs --mode postcopy"));
}

/// Issue 12: over an impaired link (a veth pair between namespaces, down
/// for 2 s, then up) postcopy pauses on both ends and recovers.
#[test]
fn a_link_down_for_two_seconds_pauses_postcopy_and_it_recovers() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            assert!(
                std::env::var("LIVEMIG_REQUIRE_KVM").as_deref() != Ok("1"),
                "LIVEMIG_REQUIRE_KVM=1 but network namespaces are not usable: {why}"
            );
            eprintln!("SKIPPED: network namespaces not usable: {why}");
            return;
        }
    };
    let listen = format!("tcp:{}:0", ns.remote);
    let receiver = Command::new("ip")
        .args(["netns", "exec", &ns.name, common::BIN, "receive"])
        .args(["--listen", &listen, "--json", "--quiet", "--mem-mib", "256"])
        .args(["--run-ms", "300", "--idle-timeout-ms", "1000"])
        .args(["--recover-timeout-s", "60"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ip netns exec livemig receive");
    let mut receiver = receiver;
    let mut reader = std::io::BufReader::new(receiver.stdout.take().unwrap());
    let addr = common::announced_address(&mut reader);
    receiver.stdout = Some(reader.into_inner());
    let mut args = vec!["send", "--to", &addr];
    args.extend_from_slice(SLOW_POSTCOPY);
    args.extend_from_slice(&["--send-timeout-ms", "1000", "--recover-timeout-s", "60"]);
    let mut sender = spawn(&args);
    let mut lines = StderrLines::of(&mut sender);
    lines.wait_for(SWITCHOVER_LINE);
    thread::sleep(Duration::from_millis(300));
    ns.set_link_up(false);
    thread::sleep(Duration::from_secs(2));
    ns.set_link_up(true);
    let send = lines.finish(sender);
    let recv = finish(receiver);
    assert_recovered_and_verified(&send, &recv, 1);
}
