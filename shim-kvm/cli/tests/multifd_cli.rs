//! `livemig` with `--cap multifd=on`: the demo and send/receive between two
//! processes move the pages over the channels and verify (digests equal,
//! every vCPU going on); multifd with postcopy is refused in one line.

#[allow(dead_code)]
mod common;

use common::{demo_ok, finish, json_of_success, kvm_available, livemig, spawn_receiver, stderr};

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
    let (receiver, addr) = spawn_receiver("tcp:127.0.0.1:0", 128);
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
    assert_eq!(s["digest"], r["digest"], "destination memory differs");
    assert_eq!(r["guest-mismatches"].as_array().unwrap().len(), 0);
    assert_eq!(s["ram"]["normal"], r["ram"]["normal"]);
    assert!(r["ram"]["multifd-bytes"].as_u64().unwrap() > 8 << 20, "{r}");
}

#[test]
fn multifd_with_postcopy_is_refused_in_one_line() {
    let out = livemig(&[
        "send",
        "--to",
        "tcp:127.0.0.1:1",
        "--cap",
        "multifd=on",
        "--mode",
        "postcopy",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("'multifd' and 'postcopy-ram' cannot be combined yet"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
