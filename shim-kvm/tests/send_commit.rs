//! `livemig send` against a destination that plays the commit handshake
//! half way: it reads the whole stream, answers LOADED, takes the COMMIT
//! and closes without confirming. The source has committed, so it must
//! never resume its guest: it reports an ambiguous end with the operator's
//! sentence and exits with status 3, its guest paused. KVM tests skip
//! loudly without `/dev/kvm` (see `common::kvm_available`).

#[allow(dead_code)]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};

use common::{kvm_available, livemig};
use livemig_core::wire::{Command, Record, StreamDecoder};
use serde_json::Value;

/// Reads a livemig stream up to its END_OF_STREAM, then answers LOADED and
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

#[test]
fn a_source_that_committed_and_gets_no_confirmation_keeps_its_guest_paused() {
    if !kvm_available() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let destination = std::thread::spawn(move || half_handshake(listener));
    let out = livemig(&[
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
    ]);
    let commit = destination.join().expect("the destination");
    let mut expected = vec![0; 10];
    Record::Command(Command::Commit)
        .encode(&mut expected)
        .expect("10 bytes");
    assert_eq!(commit, expected, "the source sent COMMIT after LOADED");

    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        err.contains("livemig: migration end ambiguous")
            && err.contains("this host will not resume it"),
        "{err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("JSON");
    let v: Value = serde_json::from_str(json).expect("valid JSON");
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["ambiguous-end"], "committed", "{v}");
    // The guest stayed paused: in the half second the tool watches it
    // after a failure, it made no progress at all.
    assert_eq!(v["guest-progress-after"], 0, "{v}");
    assert_eq!(
        v["guest-generation-before"], v["guest-generation-after"],
        "{v}"
    );
    assert_eq!(v["guest-continued-on-source"], false, "{v}");
}
