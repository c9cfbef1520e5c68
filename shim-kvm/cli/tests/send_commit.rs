//! `livemig send` against a destination that plays the commit handshake
//! half way: it reads the whole stream, answers LOADED, takes the COMMIT
//! and closes without confirming. The source has committed, so it must
//! never resume its guest by itself: it reports an ambiguous end with the
//! operator's sentence and holds its guest paused until the operator
//! decides: SIGUSR1 resumes it (exit status 0), SIGTERM discards it (exit
//! status 3, the guest never ran again). KVM tests skip
//! loudly without `/dev/kvm` (see `common::kvm_available`).

#[allow(dead_code)]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::kvm_available;
use livemig_core::return_path::RpMessage;
use livemig_core::source::SETUP_CHECK_PING;
use livemig_core::wire::{Command, Record, StreamDecoder};
use serde_json::Value;

/// Reads a livemig stream up to its END_OF_STREAM (accepting the
/// setup-time sections on the way), then answers LOADED and
/// returns the bytes that follow (the COMMIT) before closing.
fn half_handshake(listener: TcpListener) -> Vec<u8> {
    let (mut conn, _) = listener.accept().expect("accept");
    let mut scratch = vec![0u8; 16 << 20];
    let mut decoder = StreamDecoder::new(&mut scratch);
    let mut buf = vec![0u8; 1 << 20];
    'stream: loop {
        let n = conn.read(&mut buf).expect("read the stream");
        assert!(n > 0, "the source closed before the end of its stream");
        let mut input = &buf[..n];
        while !input.is_empty() {
            let d = decoder.decode(input).expect("a valid stream");
            if d.record == Some(Record::Command(Command::Ping(SETUP_CHECK_PING))) {
                // The setup-time sections are accepted: RAM may come.
                let pong = RpMessage::Pong(SETUP_CHECK_PING);
                let mut out = vec![0u8; pong.encoded_len()];
                pong.encode(&mut out).expect("PONG");
                conn.write_all(&out).expect("the setup verdict");
            }
            let ended = d.record == Some(Record::EndOfStream);
            input = &input[d.consumed..];
            if ended {
                assert!(input.is_empty(), "nothing before LOADED");
                break 'stream;
            }
        }
    }
    conn.write_all(&[1, 0, 0, 0]).expect("LOADED");
    let mut commit = [0u8; 10];
    conn.read_exact(&mut commit).expect("the COMMIT");
    // Gone without confirming: the source cannot know whether this side
    // started the guest.
    conn.shutdown(Shutdown::Both).expect("close");
    commit.to_vec()
}

/// Runs `livemig send` against [`half_handshake`], waits for its `held`
/// event, sends it `signal` and returns what it said, with the final
/// summary.
fn held_send(signal: libc::c_int) -> (Output, Value) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let destination = std::thread::spawn(move || half_handshake(listener));
    let mut child = std::process::Command::new(common::BIN)
        .args([
            "send",
            "--to",
            &format!("tcp:127.0.0.1:{port}"),
            "--json",
            "--quiet",
            "--mem-mib",
            "64",
            "--dirty-mib",
            "4",
            "--warmup-ms",
            "200",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn livemig");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("the held event");
    let event: Value = serde_json::from_str(&line).expect("JSON event");
    assert_eq!(event["event"], "held", "{event}");
    assert_eq!(event["ambiguous-end"], "committed", "{event}");
    assert_eq!(event["pid"], child.id(), "{event}");
    let commit = destination.join().expect("the destination");
    let mut expected = vec![0; 10];
    Record::Command(Command::Commit)
        .encode(&mut expected)
        .expect("10 bytes");
    assert_eq!(commit, expected, "the source sent COMMIT after LOADED");
    // Held for a while before the decision: the guest stays paused.
    std::thread::sleep(Duration::from_millis(300));
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signalling our own child, which has not been waited for.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    let mut stdout = Vec::new();
    reader.read_to_end(&mut stdout).expect("stdout");
    let mut stderr = Vec::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_end(&mut stderr)
        .expect("stderr");
    let status = child.wait().expect("wait");
    let text = String::from_utf8_lossy(&stdout);
    let json = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("JSON");
    let v: Value = serde_json::from_str(json).expect("valid JSON");
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["ambiguous-end"], "committed", "{v}");
    let err = String::from_utf8_lossy(&stderr);
    assert!(
        err.contains("livemig: migration end ambiguous")
            && err.contains("this host will not resume it")
            && err.contains(&format!(
                "the guest is held paused here (pid {pid}): send SIGUSR1 to run it here"
            )),
        "{err}"
    );
    (
        Output {
            status,
            stdout,
            stderr,
        },
        v,
    )
}

#[test]
fn a_source_that_committed_and_gets_no_confirmation_keeps_its_guest_paused_until_discarded() {
    if !kvm_available() {
        return;
    }
    let (out, v) = held_send(libc::SIGTERM);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(v["hold-decision"], "discarded", "{v}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the held guest is discarded (signal 15)"),
        "{out:?}"
    );
    // The guest stayed paused: in the half second the tool watches it
    // after a failure, it made no progress at all.
    assert_eq!(v["guest-progress-after"], 0, "{v}");
    assert_eq!(
        v["guest-generation-before"], v["guest-generation-after"],
        "{v}"
    );
    assert_eq!(v["guest-continued-on-source"], false, "{v}");
}

#[test]
fn sigusr1_resumes_a_held_source_guest() {
    if !kvm_available() {
        return;
    }
    let (out, v) = held_send(libc::SIGUSR1);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(v["hold-decision"], "run-here", "{v}");
    // Watched for half a second after the operator's decision: it ran on,
    // intact.
    let before = v["guest-generation-before"].as_u64().expect("before");
    let after = v["guest-generation-after"].as_u64().expect("after");
    assert!(after > before, "{v}");
    assert_eq!(v["guest-intact-on-source"], true, "{v}");
    assert_eq!(v["guest-continued-on-source"], true, "{v}");
}
