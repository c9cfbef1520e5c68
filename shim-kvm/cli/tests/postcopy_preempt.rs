//! Postcopy with the preempt channel between two processes: `send` opens
//! the second connection, `receive` accepts it on its listener, requested
//! pages travel on it, and both ends verify the migration byte for byte
//! (the in-protocol digest of every page against the source's books).

#[allow(dead_code)]
mod common;

use common::{
    finish, json_of_success, kvm_available, livemig, spawn_receiver, userfaultfd_available,
};

#[test]
fn postcopy_with_the_preempt_channel_and_an_unlimited_pass_verifies() {
    if !kvm_available() || !userfaultfd_available() {
        return;
    }
    let path = std::env::temp_dir().join(format!("livemig-pre-{}.sock", std::process::id()));
    let listen = format!("unix:{}", path.display());
    let (receiver, addr) = spawn_receiver(&listen, 512);
    let send = livemig(&[
        "send",
        "--to",
        &addr,
        "--mode",
        "postcopy",
        "--cap",
        "postcopy-preempt=on",
        "--json",
        "--quiet",
        "--mem-mib",
        "512",
        "--dirty-mib",
        "128",
        "--warmup-ms",
        "300",
    ]);
    let recv = finish(receiver);
    let (s, r) = (json_of_success(&send), json_of_success(&recv));
    assert_eq!(
        (&s["status"], &r["status"]),
        (&"completed".into(), &"completed".into())
    );
    assert_eq!(s["postcopy"], true, "{s}");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["guest-stamps"]["wrong"], 0, "{r}");
    assert!(
        r["guest-written-pages"].as_u64() > Some(0),
        "the guest ran: {r}"
    );
}
