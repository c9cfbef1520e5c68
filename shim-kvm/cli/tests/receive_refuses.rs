//! `livemig receive` refuses a stream it cannot start a guest from, with an
//! error naming what is wrong, and never starts the guest: a stream without
//! the vCPU section (header, block list, end of stream), and a complete
//! stream followed by bytes where it must end. The streams are written by
//! hand with `livemig-core`'s encoder. KVM tests skip loudly without
//! `/dev/kvm` (see `common::kvm_available`).

#[allow(dead_code)]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::Duration;

use common::{announced_address, kvm_available};
use livemig_core::wire::{
    BatchFlags, BlockId, BlockList, Command as WireCommand, DeviceState, MAX_BATCH_PAGES,
    PageBatch, PageEntry, PageKind, Record, encode_stream_header,
};
use livemig_kvm::memory::{DEFAULT_SLOT_BYTES, PAGE_SIZE};
use livemig_kvm::migrate::{CPU_DEVICE_ID, CPU_STATE_VERSION, ram_layout};
use livemig_kvm::vcpu::Vcpu;
use livemig_kvm::vm::Vm;
use serde_json::Value;

const MEM_MIB: u64 = 64;

fn record(r: Record<'_>) -> Vec<u8> {
    let mut out = vec![0; r.encoded_len()];
    r.encode(&mut out).expect("sized by encoded_len");
    out
}

/// The stream header and the block list of a `MEM_MIB` guest, as a
/// livemig source starts its stream.
fn preamble(vm: &Vm) -> Vec<u8> {
    let mut out = vec![0; 8];
    encode_stream_header(&mut out).expect("8 bytes");
    let layout = [ram_layout(vm.ram()).expect("layout")];
    out.extend(record(Record::RamBlocks(BlockList::from_slice(&layout))));
    out
}

/// A real vCPU state record, from a fresh vCPU of this machine.
fn cpu_record(vcpu: &Vcpu) -> Vec<u8> {
    let blob = vcpu.save_state().expect("vCPU state");
    record(Record::Device(DeviceState {
        id: BlockId::new(CPU_DEVICE_ID).expect("id"),
        instance: 0,
        version: CPU_STATE_VERSION,
        data: &blob,
    }))
}

/// Runs `livemig receive`, writes `stream` to it in one write, keeps the
/// connection open until the receiver has ended, and returns what it said.
fn receive(stream: &[u8]) -> Output {
    receive_with(|client| client.write_all(stream).expect("write the stream"))
}

/// Runs `livemig receive`, lets `talk` play the source on the connection,
/// keeps it open until the receiver has ended, and returns what it said.
/// An ambiguous end discards the held guest at once (`--hold-timeout-s 0`).
fn receive_with(talk: impl FnOnce(&mut TcpStream)) -> Output {
    receive_holding(0, talk, |_, _| {})
}

/// [`receive_with`] with `--hold-timeout-s hold_s`; once `talk` is done,
/// `decide` gets the receiver's pid and its stdout (after the
/// announcement), to read the `held` event and signal the decision.
fn receive_holding(
    hold_s: u64,
    talk: impl FnOnce(&mut TcpStream),
    decide: impl FnOnce(u32, &mut BufReader<ChildStdout>),
) -> Output {
    let mem = MEM_MIB.to_string();
    let hold = hold_s.to_string();
    let mut child: Child = Command::new(common::BIN)
        .args([
            "receive",
            "--listen",
            "tcp:127.0.0.1:0",
            "--json",
            "--quiet",
            "--mem-mib",
            &mem,
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

/// The receiver refused the stream with `needle` in its error line, and
/// its guest never ran.
fn assert_refused_without_starting(out: &Output, needle: &str) -> Value {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a refusal: {out:?}");
    let line = err
        .lines()
        .find(|l| l.starts_with("livemig: "))
        .unwrap_or_else(|| panic!("no error line in {err:?}"));
    assert!(line.contains(needle), "{line:?} does not name {needle:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary in {text:?}"));
    let v: Value = serde_json::from_str(json).expect("JSON");
    assert_eq!(v["status"], "failed", "{v}");
    for started in ["vcpu-started-ns", "guest-generation", "loaded-ns", "digest"] {
        assert!(
            v.get(started).is_none(),
            "{started} in {v}: the guest started"
        );
    }
    v
}

#[test]
fn a_stream_without_the_vcpu_section_is_refused_naming_it() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::new(MEM_MIB << 20, DEFAULT_SLOT_BYTES).expect("VM");
    let stream = [preamble(&vm), record(Record::EndOfStream)].concat();
    let out = receive(&stream);
    let v = assert_refused_without_starting(&out, "'cpu0' instance 0");
    assert!(
        v["error-desc"]
            .as_str()
            .is_some_and(|e| e.contains("refused before the guest starts")),
        "{v}"
    );
}

#[test]
fn bytes_after_the_end_of_the_stream_are_refused() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::new(MEM_MIB << 20, DEFAULT_SLOT_BYTES).expect("VM");
    let vcpu = Vcpu::new(&vm).expect("vCPU");
    let complete = [
        preamble(&vm),
        cpu_record(&vcpu),
        record(Record::EndOfStream),
    ]
    .concat();
    // Without the return path the end of the stream completes the
    // migration: garbage in the same read is refused before the guest starts.
    let out = receive(&[&complete[..], b"garbage"].concat());
    assert_refused_without_starting(&out, "7 bytes after EndOfStream");
    // With the return path the end of the stream is answered with LOADED;
    // garbage after the COMMIT in the same read is refused too, and since
    // the source has committed the receiver keeps the guest paused and says
    // so with its own exit status and the operator's sentence.
    let mut with_rp = preamble(&vm);
    with_rp.splice(8..8, record(Record::Command(WireCommand::OpenReturnPath)));
    with_rp.extend(cpu_record(&vcpu));
    with_rp.extend(record(Record::EndOfStream));
    let out = receive_with(|client| {
        client.write_all(&with_rp).expect("write the stream");
        // SWITCHOVER_ACK after the block list, then LOADED (livemig's
        // type 0x0100) after the end of the stream.
        let mut answer = [0u8; 8];
        client
            .read_exact(&mut answer)
            .expect("the destination answers");
        assert_eq!(answer, [0, 7, 0, 0, 1, 0, 0, 0]);
        let mut commit = record(Record::Command(WireCommand::Commit));
        commit.push(0xff);
        client.write_all(&commit).expect("write the commit");
    });
    let v = assert_refused_without_starting(&out, "1 bytes after Commit");
    assert_eq!(out.status.code(), Some(3), "the ambiguous end's status");
    assert_eq!(v["ambiguous-end"], "loaded", "{v}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("it says 'committed'), start it here, otherwise discard it"),
        "{err}"
    );
}

/// The non-zero pages of `vm`'s memory (all in its first slot), as Pages
/// records of block 0.
fn ram_records(vm: &Vm) -> Vec<u8> {
    let ram = vm.ram();
    let mut out = Vec::new();
    let mut page = [0u8; PAGE_SIZE];
    let (mut entries, mut data) = (Vec::new(), Vec::new());
    for index in 0..ram.region(0).expect("region 0").pages() {
        if ram.is_zero_page(0, index).expect("page") {
            continue;
        }
        ram.read_page(0, index, &mut page).expect("page");
        entries.push(PageEntry {
            index,
            kind: PageKind::Normal,
        });
        data.extend_from_slice(&page);
        if entries.len() == MAX_BATCH_PAGES {
            let batch = PageBatch::new(0, 12, BatchFlags::empty(), &entries, &data).expect("batch");
            out.extend(record(Record::Pages(batch)));
            entries.clear();
            data.clear();
        }
    }
    if !entries.is_empty() {
        let batch = PageBatch::new(0, 12, BatchFlags::empty(), &entries, &data).expect("batch");
        out.extend(record(Record::Pages(batch)));
    }
    out
}

/// Plays a source whose connection is cut after LOADED: header, return
/// path, block list, the demo guest's memory (booted, not yet run) and
/// its vCPU section, end of stream; reads the SWITCHOVER_ACK and LOADED,
/// then closes without COMMIT.
fn loaded_then_cut() -> impl FnOnce(&mut TcpStream) {
    let (vm, vcpu) = common::demo_vm(MEM_MIB << 20, &common::small_ws());
    let mut stream = preamble(&vm);
    stream.splice(8..8, record(Record::Command(WireCommand::OpenReturnPath)));
    stream.extend(ram_records(&vm));
    stream.extend(cpu_record(&vcpu));
    stream.extend(record(Record::EndOfStream));
    move |client: &mut TcpStream| {
        client.write_all(&stream).expect("write the stream");
        let mut answer = [0u8; 8];
        client
            .read_exact(&mut answer)
            .expect("the destination answers");
        assert_eq!(answer, [0, 7, 0, 0, 1, 0, 0, 0], "SWITCHOVER_ACK, LOADED");
        client
            .shutdown(std::net::Shutdown::Both)
            .expect("close without COMMIT");
    }
}

/// Reads the `held` event and, after a while held, sends `signal`.
fn decide_with(signal: libc::c_int) -> impl FnOnce(u32, &mut BufReader<ChildStdout>) {
    move |pid, reader| {
        let mut line = String::new();
        reader.read_line(&mut line).expect("the held event");
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

#[test]
fn a_loaded_guest_without_commit_is_held_and_sigusr1_runs_it_here() {
    if !kvm_available() {
        return;
    }
    let out = receive_holding(60, loaded_then_cut(), decide_with(libc::SIGUSR1));
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
    let out = receive_holding(60, loaded_then_cut(), decide_with(libc::SIGTERM));
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
    let out = receive_holding(1, loaded_then_cut(), |_, reader| {
        let mut line = String::new();
        reader.read_line(&mut line).expect("the held event");
        held_at.set(Some(std::time::Instant::now()));
        let event: Value = serde_json::from_str(&line).expect("JSON event");
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
