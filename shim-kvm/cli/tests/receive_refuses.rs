//! `livemig receive` refuses a stream it cannot start a guest from, with an
//! error naming what is wrong, and never starts the guest: a stream
//! without the livemig header, a setup-time section it cannot load
//! (answered with SHUT instead of the setup check's PONG, before any page),
//! a stream without a section the destination requires, a stream whose
//! memory differs from its digest (a page's byte flipped, a digest
//! replaced) or whose digest is missing, a section it did
//! not register (a device, a vCPU beyond its own), a run of zero pages
//! past the end of its RAM, a device state its
//! device refuses, a stream cut before its end (between records, inside
//! one), and a complete stream followed by bytes where it must end (after
//! END_OF_STREAM, after COMMIT). And it holds a guest paused after an
//! ambiguous end (LOADED sent, then the connection cut without COMMIT)
//! until the operator decides: SIGUSR1 runs it, SIGTERM or
//! `--hold-timeout-s` discards it (exit status 3).
//!
//! The streams are today's real stream: recorded once per test binary
//! from a real `livemig send` into a fake destination that accepts the
//! setup-time check (PONG) as a livemig destination does, then replayed
//! whole, cut or corrupted. KVM tests skip loudly without `/dev/kvm` (see
//! `common::kvm_available`).

#[allow(dead_code)]
mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{announced_address, kvm_available};
use livemig_cli::events::ARRIVED_LINE;
use livemig_core::return_path::{RpDecoder, RpMessage};
use livemig_core::source::{CATCH_UP_PING, SETUP_CHECK_PING};
use livemig_core::wire::{
    BlockSums, Command as WireCommand, DeviceId, DeviceState, PageRange, RECORD_HEADER_LEN, Record,
    StreamDecoder, ZeroRun,
};
use serde_json::Value;

/// The guest's memory on both ends: small, so a run stays short.
const MEM_MIB: &str = "64";

/// One record of the recorded stream: what it is and where its bytes are.
#[derive(Debug)]
struct Span {
    /// `device ID INSTANCE`, `ping`, `open-return-path`, `ram-blocks`,
    /// `pages`, `end`, or `other`.
    what: String,
    start: usize,
    end: usize,
    /// A Device record's version and state bytes.
    device: Option<(u32, Vec<u8>)>,
}

/// A stream a real `livemig send` wrote, up to and with its END_OF_STREAM.
#[derive(Debug)]
struct Recorded {
    bytes: Vec<u8>,
    spans: Vec<Span>,
}

impl Recorded {
    /// The stream without the record named `what` (the first one).
    fn without(&self, what: &str) -> Vec<u8> {
        self.replaced(what, &[])
    }

    fn span(&self, what: &str) -> &Span {
        self.spans
            .iter()
            .find(|s| s.what == what)
            .unwrap_or_else(|| panic!("no {what:?} in {:?}", self.labels()))
    }

    /// The stream with the record named `what` replaced by `record`.
    fn replaced(&self, what: &str, record: &[u8]) -> Vec<u8> {
        let span = self.span(what);
        [&self.bytes[..span.start], record, &self.bytes[span.end..]].concat()
    }

    /// The stream with `record` inserted before the record named `what`.
    fn inserted_before(&self, what: &str, record: &[u8]) -> Vec<u8> {
        let at = self.span(what).start;
        [&self.bytes[..at], record, &self.bytes[at..]].concat()
    }

    /// The version and state bytes of the Device record named `what`.
    fn device(&self, what: &str) -> (u32, &[u8]) {
        let (version, data) = self
            .span(what)
            .device
            .as_ref()
            .unwrap_or_else(|| panic!("{what:?} is not a Device record"));
        (*version, data)
    }

    fn labels(&self) -> Vec<&str> {
        self.spans.iter().map(|s| s.what.as_str()).collect()
    }
}

fn label(record: &Record<'_>) -> String {
    match record {
        Record::Device(d) => format!("device {} {}", d.id.as_str(), d.instance),
        Record::EndOfStream => "end".into(),
        Record::Command(WireCommand::Ping(_)) => "ping".into(),
        Record::Command(WireCommand::OpenReturnPath) => "open-return-path".into(),
        Record::RamBlocks(_) => "ram-blocks".into(),
        Record::Pages(_) => "pages".into(),
        Record::ZeroRun(_) => "zero-run".into(),
        Record::Digest(_) => "digest".into(),
        _ => "other".into(),
    }
}

/// Plays a livemig destination up to END_OF_STREAM: answers every PING
/// with its PONG (the setup-time sections are accepted, the catch-up
/// before the stop is done),
/// records every byte and where each record lies, and closes before
/// LOADED, so the source keeps its guest.
fn record_destination(listener: TcpListener) -> Recorded {
    let (mut conn, _) = listener.accept().expect("accept");
    let mut scratch = vec![0u8; 16 << 20];
    let mut decoder = StreamDecoder::new(&mut scratch);
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = Vec::new();
    let mut spans = Vec::new();
    let mut start = 0;
    'stream: loop {
        let n = conn.read(&mut buf).expect("read the stream");
        assert!(n > 0, "the source closed before the end of its stream");
        let mut input = &buf[..n];
        while !input.is_empty() {
            let d = decoder.decode(input).expect("a valid stream");
            let consumed = d.consumed;
            bytes.extend_from_slice(&input[..consumed]);
            input = &input[consumed..];
            let Some(record) = d.record else { continue };
            if let Record::Command(WireCommand::Ping(value)) = record {
                let pong = RpMessage::Pong(value);
                let mut out = vec![0u8; pong.encoded_len()];
                pong.encode(&mut out).expect("PONG");
                conn.write_all(&out).expect("the PONG");
            }
            let what = label(&record);
            let device = match &record {
                Record::Device(d) => Some((d.version, d.data.to_vec())),
                _ => None,
            };
            spans.push(Span {
                what: what.clone(),
                start,
                end: bytes.len(),
                device,
            });
            start = bytes.len();
            if what == "end" {
                assert!(input.is_empty(), "bytes after END_OF_STREAM, before LOADED");
                break 'stream;
            }
        }
    }
    conn.shutdown(Shutdown::Both).expect("close before LOADED");
    Recorded { bytes, spans }
}

/// The stream of one real `livemig send`, recorded once for all tests.
fn recorded() -> &'static Recorded {
    static RECORDED: OnceLock<Recorded> = OnceLock::new();
    RECORDED.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let destination = std::thread::spawn(move || record_destination(listener));
        let send = common::spawn(&[
            "send",
            "--to",
            &format!("tcp:127.0.0.1:{port}"),
            "--json",
            "--quiet",
            "--mem-mib",
            MEM_MIB,
            "--dirty-mib",
            "4",
            "--warmup-ms",
            "200",
        ]);
        let recorded = destination.join().expect("the recording destination");
        // Cut before LOADED: the source fails and keeps its guest.
        let out = common::finish(send);
        assert!(!out.status.success(), "{out:?}");
        recorded
    })
}

/// Runs `livemig receive --hold-timeout-s hold_s`, lets `talk` play the
/// source on the connection; once `talk` is done, `decide` gets the
/// receiver's pid and its stdout (after the announcement). Keeps the
/// connection open until the receiver has ended.
fn receive_holding(
    hold_s: u64,
    talk: impl FnOnce(&mut TcpStream),
    decide: impl FnOnce(u32, &mut BufReader<ChildStdout>),
) -> Output {
    let hold = hold_s.to_string();
    let mut child: Child = Command::new(common::BIN)
        .args([
            "receive",
            "--listen",
            "tcp:127.0.0.1:0",
            "--json",
            "--quiet",
            "--mem-mib",
            MEM_MIB,
            "--run-ms",
            "200",
            "--idle-timeout-ms",
            "2000",
        ])
        .args(["--hold-timeout-s", &hold])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn livemig");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let addr = announced_address(&mut reader);
    let addr = addr
        .strip_prefix("tcp:")
        .unwrap_or_else(|| panic!("not a TCP address: {addr:?}"));
    let mut client = TcpStream::connect(addr).expect("connect");
    talk(&mut client);
    decide(child.id(), &mut reader);
    let mut stdout = Vec::new();
    reader.read_to_end(&mut stdout).expect("stdout");
    let mut stderr = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_end(&mut stderr).expect("stderr");
    }
    let status = child.wait().expect("wait");
    drop(client);
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Writes `stream` in one write, to a receiver that refuses it: it may
/// close before the whole stream is written.
fn write_refused(client: &mut TcpStream, stream: &[u8]) {
    if let Err(e) = client.write_all(stream) {
        assert!(
            matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
            "write the stream: {e}"
        );
    }
}

/// Writes `stream` (see [`write_refused`]); an ambiguous end discards at
/// once.
fn receive(stream: &[u8]) -> Output {
    receive_holding(0, |client| write_refused(client, stream), |_, _| {})
}

/// A return-path message of the destination, as this test tells them
/// apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// The setup check's PONG: the setup-time sections loaded.
    SetupPong,
    SwitchoverAck,
    /// The PONG to the catch-up ping before the stop.
    CatchUpPong,
    Loaded,
    Shut {
        error: bool,
    },
}

/// The destination's return path, read message by message.
struct ReturnPath {
    decoder: RpDecoder,
    pending: Vec<u8>,
}

impl ReturnPath {
    fn new() -> Self {
        Self {
            decoder: RpDecoder::new(4096).expect("page size"),
            pending: Vec::new(),
        }
    }

    /// The next message, or `None` once the destination closed.
    fn next(&mut self, client: &mut TcpStream) -> Option<Answer> {
        let mut buf = [0u8; 256];
        loop {
            if !self.pending.is_empty() {
                let (used, msg) = self
                    .decoder
                    .decode(&self.pending)
                    .expect("a valid return path");
                let answer = msg.map(|m| match m {
                    RpMessage::Pong(SETUP_CHECK_PING) => Answer::SetupPong,
                    RpMessage::SwitchoverAck => Answer::SwitchoverAck,
                    RpMessage::Pong(CATCH_UP_PING) => Answer::CatchUpPong,
                    RpMessage::Loaded => Answer::Loaded,
                    RpMessage::Shut { error } => Answer::Shut { error },
                    other => panic!("unexpected on the return path: {other:?}"),
                });
                self.pending.drain(..used);
                if answer.is_some() {
                    return answer;
                }
            }
            let n = client.read(&mut buf).expect("read the return path");
            if n == 0 {
                assert!(self.pending.is_empty(), "cut message: {:?}", self.pending);
                return None;
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }
}

/// Writes `stream`, then closes the connection for writing: the source is
/// gone mid-stream.
fn receive_cut(stream: &[u8]) -> Output {
    receive_holding(
        0,
        |client| {
            client.write_all(stream).expect("write the stream");
            client.shutdown(Shutdown::Write).expect("cut the stream");
        },
        |_, _| {},
    )
}

/// Reads the return path until LOADED; true if it came, false if the
/// destination closed first. Panics on anything but the setup check's
/// and the catch-up's PONGs and the SWITCHOVER_ACK before it.
fn read_until_loaded(client: &mut TcpStream) -> bool {
    let mut rp = ReturnPath::new();
    loop {
        match rp.next(client) {
            None => return false,
            Some(Answer::Loaded) => return true,
            Some(Answer::SetupPong | Answer::SwitchoverAck | Answer::CatchUpPong) => {}
            Some(other) => panic!("{other:?} before LOADED"),
        }
    }
}

/// The final JSON summary of `out`.
fn summary(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary in {text:?}"));
    serde_json::from_str(json).expect("JSON")
}

/// The receiver refused the stream with `needle` in its error line (the
/// first line `livemig: ` begins but the one saying the migration
/// arrived), and its guest never ran.
fn assert_refused_without_starting(out: &Output, needle: &str) -> Value {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a refusal: {out:?}");
    let line = err
        .lines()
        .find(|l| l.starts_with("livemig: ") && !l.contains(ARRIVED_LINE))
        .unwrap_or_else(|| panic!("no error line in {err:?}"));
    assert!(line.contains(needle), "{line:?} does not name {needle:?}");
    let v = summary(out);
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["guest-started"], false, "{v}");
    for started in ["vcpu-started-ns", "guest-generation", "loaded-ns", "digest"] {
        assert!(
            v.get(started).is_none(),
            "{started} in {v}: the guest started"
        );
    }
    v
}

/// The COMMIT record a source sends after LOADED.
fn commit() -> Vec<u8> {
    let mut commit = vec![0; 10];
    Record::Command(WireCommand::Commit)
        .encode(&mut commit)
        .expect("10 bytes");
    commit
}

/// The recorded stream, unchanged, with LOADED answered by COMMIT: the
/// destination starts its guest. The refusals below differ from it only
/// by their cut or corruption.
#[test]
fn the_recorded_stream_is_received_and_its_guest_runs() {
    if !kvm_available() {
        return;
    }
    let rec = recorded();
    let out = receive_holding(
        0,
        |client| {
            client.write_all(&rec.bytes).expect("write the stream");
            assert!(read_until_loaded(client), "no LOADED");
            client.write_all(&commit()).expect("write the commit");
        },
        |_, _| {},
    );
    assert!(out.status.success(), "{out:?}");
    let v = summary(&out);
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["guest-started"], true, "{v}");
    assert!(v.get("vcpu-started-ns").is_some(), "{v}");
    assert!(
        v["guest-progress-exits"].as_u64().expect("exits") > 0,
        "{v}"
    );
}

/// The recorded stream with one byte of a page's data flipped: it
/// decodes as well as the original, and only the digest shows it.
#[test]
fn a_page_flipped_in_transit_is_refused_by_the_digest() {
    if !kvm_available() {
        return;
    }
    let rec = recorded();
    let mut stream = rec.bytes.clone();
    let largest = rec
        .spans
        .iter()
        .filter(|s| s.what == "pages")
        .max_by_key(|s| s.end - s.start)
        .expect("a pages record");
    // The last byte of the largest batch is page data: entries come
    // first, the pages' bytes after them.
    assert!(largest.end - largest.start > 4096, "a batch with pages");
    stream[largest.end - 1] ^= 0x40;
    let out = receive(&stream);
    let v = assert_refused_without_starting(&out, "verification failed");
    assert_eq!(v["verification"]["mismatch"]["block"], 0, "{v}");
}

/// A digest of other memory, and no digest at all, are refused the same.
#[test]
fn a_wrong_or_missing_digest_is_refused() {
    if !kvm_available() {
        return;
    }
    let rec = recorded();
    let wrong = Record::Digest(BlockSums::from_slice(&[0x1234]));
    let mut record = vec![0u8; wrong.encoded_len()];
    wrong.encode(&mut record).expect("a digest record");
    let out = receive(&rec.replaced("digest", &record));
    assert_refused_without_starting(&out, "verification failed");
    let out = receive(&rec.without("digest"));
    assert_refused_without_starting(&out, "without the digest");
}

#[test]
fn a_stream_without_the_serial_section_is_refused_naming_it() {
    if !kvm_available() {
        return;
    }
    let out = receive(&recorded().without("device serial 0"));
    let v = assert_refused_without_starting(&out, "'serial' instance 0");
    assert!(
        v["error-desc"]
            .as_str()
            .is_some_and(|e| e.contains("refused before the guest starts")),
        "{v}"
    );
}

#[test]
fn a_stream_without_the_second_vcpu_section_is_refused_naming_it() {
    if !kvm_available() {
        return;
    }
    let out = receive(&recorded().without("device cpu 1"));
    assert_refused_without_starting(&out, "'cpu' instance 1");
}

#[test]
fn a_stream_without_the_kvm_vm_section_is_refused_naming_it() {
    if !kvm_available() {
        return;
    }
    let out = receive(&recorded().without("device kvm-vm 0"));
    assert_refused_without_starting(&out, "'kvm-vm' instance 0");
}

// A setup-time section left out is not caught by the setup check (its
// PONG says the sections that came loaded, not that all did): the
// refusal comes at the end of the stream, still before the guest starts.
#[test]
fn a_stream_without_the_cpu_model_section_is_refused_naming_it() {
    if !kvm_available() {
        return;
    }
    let out = receive(&recorded().without("device cpu-model 0"));
    assert_refused_without_starting(&out, "'cpu-model' instance 0");
}

#[test]
fn a_stream_without_the_runstate_section_is_refused_naming_it() {
    if !kvm_available() {
        return;
    }
    let out = receive(&recorded().without("device runstate 0"));
    assert_refused_without_starting(&out, "'runstate' instance 0");
}

#[test]
fn bytes_after_the_end_of_the_stream_are_refused() {
    if !kvm_available() {
        return;
    }
    let out = receive(&[&recorded().bytes[..], b"garbage"].concat());
    assert_refused_without_starting(
        &out,
        "sent 7 bytes after EndOfStream, where its stream must end: refused, the guest was not started",
    );
}

#[test]
fn bytes_after_the_commit_are_refused_and_the_guest_is_not_started() {
    if !kvm_available() {
        return;
    }
    let out = receive_holding(
        0,
        |client| {
            client
                .write_all(&recorded().bytes)
                .expect("write the stream");
            assert!(read_until_loaded(client), "no LOADED");
            let mut commit = commit();
            commit.push(0xff);
            client.write_all(&commit).expect("write the commit");
        },
        |_, _| {},
    );
    let v = assert_refused_without_starting(
        &out,
        "sent 1 bytes after Commit, where its stream must end: refused, the guest was not started",
    );
    // The source has committed: the receiver says the end is ambiguous,
    // with its own exit status and the operator's sentence.
    assert_eq!(out.status.code(), Some(3), "the ambiguous end's status");
    assert_eq!(v["ambiguous-end"], "loaded", "{v}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("it says 'committed'), start it here, otherwise discard it"),
        "{err}"
    );
}

/// Plays a source whose connection is cut after LOADED: the whole
/// recorded stream, then LOADED read and the connection closed without
/// COMMIT.
fn loaded_then_cut(client: &mut TcpStream) {
    client
        .write_all(&recorded().bytes)
        .expect("write the stream");
    assert!(read_until_loaded(client), "no LOADED");
    client
        .shutdown(Shutdown::Both)
        .expect("close without COMMIT");
}

/// The event after the `migration-arrived` one, which `receive` prints
/// first.
fn next_event_after_arrival(reader: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("the arrival event");
    let event: Value = serde_json::from_str(&line).expect("JSON event");
    assert_eq!(event["event"], "migration-arrived", "{event}");
    line.clear();
    reader.read_line(&mut line).expect("the next event");
    line
}

/// Reads the `held` event and, after a while held, sends `signal`.
fn decide_with(signal: libc::c_int) -> impl FnOnce(u32, &mut BufReader<ChildStdout>) {
    move |pid, reader| {
        let line = next_event_after_arrival(reader);
        let event: Value = serde_json::from_str(&line).expect("JSON event");
        assert_eq!(event["event"], "held", "{event}");
        assert_eq!(event["ambiguous-end"], "loaded", "{event}");
        assert_eq!(event["pid"], pid, "{event}");
        std::thread::sleep(Duration::from_millis(200));
        let pid = i32::try_from(pid).expect("pid");
        // SAFETY: signalling our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
}

#[test]
fn a_loaded_guest_without_commit_is_held_and_sigusr1_runs_it_here() {
    if !kvm_available() {
        return;
    }
    let out = receive_holding(60, loaded_then_cut, decide_with(libc::SIGUSR1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("start it here, otherwise discard it")
            && err.contains("the guest is held paused here (pid ")
            && err.contains("the guest runs here, as the operator decided"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = summary(&out);
    assert_eq!(v["ambiguous-end"], "loaded", "{v}");
    assert_eq!(v["hold-decision"], "run-here", "{v}");
    assert_eq!(v["guest-continued"], true, "{v}");
    assert!(
        v["guest-progress-exits"].as_u64().expect("exits") > 0,
        "{v}"
    );
    assert!(v.get("vcpu-started-ns").is_some(), "{v}");
}

#[test]
fn a_loaded_guest_without_commit_is_held_and_sigterm_discards_it() {
    if !kvm_available() {
        return;
    }
    let out = receive_holding(60, loaded_then_cut, decide_with(libc::SIGTERM));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the held guest is discarded (signal 15)"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let v = summary(&out);
    assert_eq!(v["ambiguous-end"], "loaded", "{v}");
    assert_eq!(v["hold-decision"], "discarded", "{v}");
    for started in ["vcpu-started-ns", "guest-generation", "guest-continued"] {
        assert!(
            v.get(started).is_none(),
            "{started} in {v}: the guest started"
        );
    }
}

#[test]
fn a_held_guest_without_a_decision_is_discarded_after_the_hold_timeout() {
    if !kvm_available() {
        return;
    }
    let held_at = std::cell::Cell::new(None);
    let out = receive_holding(1, loaded_then_cut, |_, reader| {
        let line = next_event_after_arrival(reader);
        held_at.set(Some(Instant::now()));
        let event: Value = serde_json::from_str(&line).expect("JSON event");
        assert_eq!(event["event"], "held", "{event}");
        assert_eq!(event["hold-timeout-s"], 1, "{event}");
    });
    let held_for = held_at.get().expect("held").elapsed();
    assert!(held_for >= Duration::from_millis(900), "{held_for:?}");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the held guest is discarded (no decision in time)"),
        "{err}"
    );
    let v = summary(&out);
    assert_eq!(v["hold-decision"], "discarded-after-timeout", "{v}");
    assert!(v.get("vcpu-started-ns").is_none(), "the guest started: {v}");
}

/// One Device record, encoded as a livemig source writes it.
fn device_record(id: &str, instance: u32, version: u32, data: &[u8]) -> Vec<u8> {
    let record = Record::Device(DeviceState {
        id: DeviceId::new(id).expect("id"),
        instance,
        version,
        data,
    });
    let mut out = vec![0; record.encoded_len()];
    record.encode(&mut out).expect("sized by encoded_len");
    out
}

/// Writes `stream`, which ends with the setup check's PING, reads the
/// destination's verdict (SHUT with an error, no PONG: no page may follow),
/// and returns what the receiver said.
fn refused_at_setup(stream: Vec<u8>) -> Output {
    receive_holding(
        0,
        move |client| {
            client.write_all(&stream).expect("write the stream");
            let mut rp = ReturnPath::new();
            let mut answers = Vec::new();
            while let Some(answer) = rp.next(client) {
                answers.push(answer);
            }
            assert_eq!(
                answers.last(),
                Some(&Answer::Shut { error: true }),
                "{answers:?}"
            );
            assert!(!answers.contains(&Answer::SetupPong), "{answers:?}");
        },
        |_, _| {},
    )
}

/// The recorded stream up to and with its setup check's PING, with the
/// setup-time Device record `what` replaced by `record`.
fn setup_with(what: &str, record: &[u8]) -> Vec<u8> {
    let rec = recorded();
    let (section, ping) = (rec.span(what), rec.span("ping"));
    assert!(
        section.end <= ping.start,
        "{what} comes before the setup check"
    );
    [
        &rec.bytes[..section.start],
        record,
        &rec.bytes[section.end..ping.end],
    ]
    .concat()
}

#[test]
fn a_cpu_model_of_another_version_is_refused_at_setup() {
    if !kvm_available() {
        return;
    }
    let (version, data) = recorded().device("device cpu-model 0");
    let stream = setup_with(
        "device cpu-model 0",
        &device_record("cpu-model", 0, version + 1, data),
    );
    let out = refused_at_setup(stream);
    assert_refused_without_starting(
        &out,
        &format!(
            "the destination failed loading device state: section 'cpu-model' instance 0 has version {}, this destination loads versions \
             {version} to {version}: refused before the guest starts",
            version + 1
        ),
    );
}

#[test]
fn a_cut_cpu_model_is_refused_at_setup() {
    if !kvm_available() {
        return;
    }
    let (version, data) = recorded().device("device cpu-model 0");
    let stream = setup_with(
        "device cpu-model 0",
        &device_record("cpu-model", 0, version, &data[..data.len() - 1]),
    );
    let out = refused_at_setup(stream);
    assert_refused_without_starting(
        &out,
        "the destination failed loading device state: CPU model: the source's record: \
         CPU model declares ",
    );
}

#[test]
fn a_runstate_that_is_not_0_or_1_is_refused_at_setup() {
    if !kvm_available() {
        return;
    }
    let (version, _) = recorded().device("device runstate 0");
    let stream = setup_with(
        "device runstate 0",
        &device_record("runstate", 0, version, &[1, 1]),
    );
    let out = refused_at_setup(stream);
    assert_refused_without_starting(
        &out,
        "the destination failed loading device state: runstate: 2 bytes where one byte of 0 \
         or 1 belongs",
    );
}

#[test]
fn a_stream_cut_in_the_middle_of_its_ram_is_refused() {
    if !kvm_available() {
        return;
    }
    let rec = recorded();
    let pages: Vec<&Span> = rec.spans.iter().filter(|s| s.what == "pages").collect();
    assert!(pages.len() >= 2, "{:?}", rec.labels());
    // Between two records, then in the middle of one.
    let between = pages[pages.len() / 2].end;
    let out = receive_cut(&rec.bytes[..between]);
    assert_refused_without_starting(
        &out,
        "connection closed early: connection closed between records, before EndOfStream",
    );
    // The next batch with more than 100 body bytes (not an
    // end-of-iteration marker).
    let cut = pages[pages.len() / 2 + 1..]
        .iter()
        .find(|s| s.end - s.start > RECORD_HEADER_LEN + 100)
        .expect("a batch with pages after the middle one");
    let out = receive_cut(&rec.bytes[..cut.start + RECORD_HEADER_LEN + 100]);
    let body = cut.end - cut.start - RECORD_HEADER_LEN;
    assert_refused_without_starting(
        &out,
        &format!(
            "connection closed early: connection closed in the body of a record of kind 0x0003 \
             after 100 of {body} bytes"
        ),
    );
}

#[test]
fn a_stream_cut_before_its_end_of_stream_is_refused() {
    if !kvm_available() {
        return;
    }
    let rec = recorded();
    let out = receive_cut(&rec.bytes[..rec.span("end").start]);
    assert_refused_without_starting(
        &out,
        "connection closed early: connection closed between records, before EndOfStream",
    );
}

#[test]
fn a_section_the_destination_did_not_register_is_refused_naming_it() {
    if !kvm_available() {
        return;
    }
    let bogus = device_record("bogus", 0, 1, b"state");
    let out = receive(&recorded().inserted_before("end", &bogus));
    assert_refused_without_starting(
        &out,
        "the stream carries section 'bogus' instance 0, which this destination did not \
         register: refused before the guest starts",
    );
}

#[test]
fn a_zero_run_past_the_end_of_ram_is_refused_naming_the_page() {
    if !kvm_available() {
        return;
    }
    let run = Record::ZeroRun(ZeroRun {
        block: 0,
        page_shift: 12,
        range: PageRange {
            first: 1 << 40,
            count: 2,
        },
    });
    let mut bytes = vec![0; run.encoded_len()];
    run.encode(&mut bytes).expect("a zero run encodes");
    let out = receive(&recorded().inserted_before("end", &bytes));
    assert_refused_without_starting(
        &out,
        &format!("page {} lies outside block 0, which has", (1u64 << 40) + 1),
    );
}

#[test]
fn a_vcpu_section_beyond_the_destination_vcpus_is_refused_naming_it() {
    if !kvm_available() {
        return;
    }
    let rec = recorded();
    let (version, data) = rec.device("device cpu 1");
    let third = device_record("cpu", 2, version, data);
    let out = receive(&rec.inserted_before("device kvm-vm 0", &third));
    assert_refused_without_starting(
        &out,
        "the stream carries section 'cpu' instance 2, which this destination did not \
         register: refused before the guest starts",
    );
}

#[test]
fn a_stream_without_the_livemig_header_is_refused() {
    if !kvm_available() {
        return;
    }
    let mut stream = recorded().bytes.clone();
    stream[0] ^= 0xff;
    let out = receive(&stream);
    assert_refused_without_starting(
        &out,
        "is not a livemig source: its stream does not start with the livemig header",
    );
}

#[test]
fn a_cut_device_state_is_refused_by_its_device() {
    if !kvm_available() {
        return;
    }
    let rec = recorded();
    let (version, data) = rec.device("device serial 0");
    let cut = device_record("serial", 0, version, &data[..data.len() - 1]);
    let out = receive(&rec.replaced("device serial 0", &cut));
    assert_refused_without_starting(
        &out,
        &format!(
            "the destination failed loading device state: loading device 'serial' instance 0 \
             failed: serial state of {} bytes is truncated",
            data.len() - 1
        ),
    );
}
