//! `livemig` with `--cap multifd=on`: the demo and send/receive between two
//! processes move the pages over the channels and verify (in-protocol on
//! both ends, digests equal, every vCPU going on), also into a destination
//! that preallocated its RAM; postcopy after a multifd precopy verifies
//! too, with the preempt channel and after a cut; a preallocated
//! destination with postcopy is refused in one line.

#[allow(dead_code)]
mod common;

use common::{
    demo_ok, finish, json_of_success, kvm_available, livemig, spawn_receiver_with, stderr,
    userfaultfd_available,
};

#[test]
fn demo_over_two_channels_verifies() {
    if !kvm_available() {
        return;
    }
    let v = demo_ok(&[
        "--cap",
        "multifd=on",
        "--param",
        "multifd-channels=2",
        "--mem-mib",
        "256",
        "--dirty-mib",
        "16",
        "--warmup-ms",
        "300",
        "--run-ms",
        "300",
    ]);
    eprintln!("MEASURE demo multifd 2 channels: {v}");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["verified"], true);
    // The in-protocol verification on both ends (pages the channel
    // receivers placed are booked), and the demo's own digest.
    assert_eq!(v["verification"], "verified", "{v}");
    assert_eq!(v["destination"]["verification"], "verified", "{v}");
    assert_eq!(v["destination"]["digest"], v["digest"]);
    assert!(
        v["ram"]["multifd-bytes"].as_u64().unwrap() > 16 << 20,
        "{v}"
    );
}

#[test]
fn send_and_receive_over_three_channels_verify() {
    if !kvm_available() {
        return;
    }
    // `--digest`: the second opinion besides the in-protocol verdict.
    let (receiver, addr) = spawn_receiver_with("tcp:127.0.0.1:0", 128, &["--digest"]);
    let send = livemig(&[
        "send",
        "--to",
        &addr,
        "--json",
        "--quiet",
        "--mem-mib",
        "128",
        "--dirty-mib",
        "8",
        "--warmup-ms",
        "300",
        "--cap",
        "multifd=on",
        "--param",
        "multifd-channels=3",
    ]);
    let recv = finish(receiver);
    let (s, r) = (json_of_success(&send), json_of_success(&recv));
    assert_eq!(s["status"], "completed");
    assert_eq!(r["status"], "completed");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(s["verification"], "verified", "{s}");
    assert_eq!(r["verification"], "verified", "{r}");
    assert_eq!(s["digest"], r["digest"], "destination memory differs");
    assert_eq!(r["guest-mismatches"].as_array().unwrap().len(), 0);
    assert_eq!(s["ram"]["normal"], r["ram"]["normal"]);
    assert!(r["ram"]["multifd-bytes"].as_u64().unwrap() > 8 << 20, "{r}");
}

#[test]
fn postcopy_after_a_multifd_precopy_with_the_preempt_channel_verifies() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    let (receiver, addr) = spawn_receiver_with("tcp:127.0.0.1:0", 256, &[]);
    let send = livemig(&[
        "send",
        "--to",
        &addr,
        "--json",
        "--quiet",
        "--mode",
        "postcopy",
        "--cap",
        "multifd=on",
        "--param",
        "multifd-channels=2",
        "--cap",
        "postcopy-preempt=on",
        "--mem-mib",
        "256",
        "--dirty-mib",
        "64",
        "--warmup-ms",
        "300",
    ]);
    let recv = finish(receiver);
    let (s, r) = (json_of_success(&send), json_of_success(&recv));
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(s["postcopy"], true, "{s}");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["guest-stamps"]["wrong"], 0, "{r}");
    // The precopy pass went over the channels, the postcopy pass over the
    // main stream.
    let multifd = r["ram"]["multifd-bytes"].as_u64().unwrap();
    let total = r["ram"]["transferred"].as_u64().unwrap();
    assert!(multifd > 16 << 20, "{r}");
    assert!(total > multifd + (1 << 20), "{r}");
}

#[test]
fn a_cut_postcopy_after_a_multifd_precopy_recovers() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    let v = demo_ok(&[
        "--mode",
        "postcopy",
        "--cap",
        "multifd=on",
        "--mem-mib",
        "256",
        "--dirty-mib",
        "64",
        "--warmup-ms",
        "300",
        "--cut-after-ms",
        "100",
    ]);
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert!(v["postcopy-recoveries"].as_u64() >= Some(1), "{v}");
    assert!(v["ram"]["multifd-bytes"].as_u64() > Some(16 << 20), "{v}");
}

#[test]
fn demo_into_a_preallocated_destination_verifies() {
    if !kvm_available() {
        return;
    }
    let v = demo_ok(&[
        "--cap",
        "multifd=on",
        "--param",
        "multifd-channels=2",
        "--mem-prealloc",
        "--mem-mib",
        "256",
        "--dirty-mib",
        "16",
        "--warmup-ms",
        "300",
        "--run-ms",
        "300",
    ]);
    assert_eq!(v["status"], "completed");
    assert_eq!(v["verified"], true);
    assert_eq!(v["verification"], "verified", "{v}");
    assert_eq!(v["destination"]["verification"], "verified", "{v}");
    assert_eq!(v["destination"]["digest"], v["digest"]);
    assert!(
        v["ram"]["multifd-bytes"].as_u64().unwrap() > 16 << 20,
        "{v}"
    );
    // Preallocated at the VMM's start-up, before its address was
    // announced, and so nothing populated run by run.
    let d = &v["destination"];
    assert_eq!(d["mem-prealloc"], true, "{d}");
    assert_eq!(d["mem-prealloc-when"], "start-up", "{d}");
    assert!(d["mem-prealloc-ms"].as_f64().unwrap() > 0.0, "{d}");
    assert_eq!(d["populated-pages"], 0, "{d}");
}

#[test]
fn mem_prealloc_with_postcopy_is_refused_in_one_line() {
    let out = livemig(&["demo", "--mem-prealloc", "--mode", "postcopy"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--mem-prealloc with postcopy") && err.contains("missing pages"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = livemig(&[
        "receive",
        "--listen",
        "tcp:127.0.0.1:0",
        "--mem-prealloc",
        "--cap",
        "postcopy-blocktime=on",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("refuses postcopy"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
