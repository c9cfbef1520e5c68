//! `livemig bench --vs-qemu` end to end, scaled down (64 MiB, one run):
//! QEMU boots the same guest, migrates it over QMP, and the output carries
//! QEMU's figures and the ratios livemig / QEMU. Needs `/dev/kvm` (skips
//! loudly without it, see `common::kvm_available`) and, for the QEMU part,
//! `qemu-system-x86_64` on PATH: without it the first test skips loudly,
//! unless `LIVEMIG_REQUIRE_QEMU=1` (set by `cargo xtask test`, which
//! installs QEMU first), where that is a failure.

// Only the loud-skip and run helpers are used here; the VM helpers serve
// other tests.
#[allow(dead_code)]
mod common;

use std::process::{Command, Stdio};

use common::{BIN, json_of, kvm_available, livemig, stderr};
use livemig_cli::qemu;

const SMALL: [&str; 10] = [
    "--case",
    "busy-1g",
    "--runs",
    "1",
    "--mem-mib-override",
    "64",
    "--warmup-ms",
    "200",
    "--run-ms",
    "200",
];

fn qemu_available() -> bool {
    let found = qemu::find_qemu().is_some();
    if !found {
        assert!(
            std::env::var("LIVEMIG_REQUIRE_QEMU").as_deref() != Ok("1"),
            "LIVEMIG_REQUIRE_QEMU=1 but {} is not on PATH",
            qemu::QEMU_BINARY
        );
        eprintln!("SKIPPED: {} not on PATH", qemu::QEMU_BINARY);
    }
    found
}

#[test]
fn vs_qemu_reports_qemu_runs_and_finite_ratios() {
    if !kvm_available() || !qemu_available() {
        return;
    }
    let mut args = vec!["bench", "--vs-qemu", "--json"];
    args.extend(SMALL);
    let out = livemig(&args);
    assert!(out.status.success(), "{out:?}");
    let v = json_of(&out);
    eprintln!("MEASURE bench --vs-qemu busy-1g at 64 MiB: {v}");
    assert_eq!(v["verified"], true, "{v}");
    assert!(
        v["qemu-version"]
            .as_str()
            .is_some_and(|s| s.contains("QEMU")),
        "{v}"
    );
    let q = &v["qemu"];
    assert_eq!(q["runs"], 1);
    let run = &q["run-results"][0];
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["destination-status"], "running", "{run}");
    assert!(run["stamped-after-stop"].as_u64().unwrap() > 0, "{run}");
    // QEMU's RAM total counts its firmware and option ROM blocks too.
    let ram = run["ram-total"].as_u64().unwrap();
    assert!((64 << 20..66 << 20).contains(&ram), "{run}");
    assert!(run["total-time"].as_f64().unwrap() > 0.0, "{run}");
    // The 4 MiB working set is on the wire at least once.
    assert!(run["transferred"].as_u64().unwrap() > 4 << 20, "{run}");
    for key in ["total-time", "source-downtime", "downtime", "transferred"] {
        let r = v["livemig-over-qemu"][key].as_f64();
        assert!(
            r.is_some_and(|r| r.is_finite() && r > 0.0),
            "{key}: {}",
            v["livemig-over-qemu"]
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "one JSON object per case: {text}");
}

#[test]
fn vs_qemu_without_qemu_says_so_and_runs_livemig_alone() {
    if !kvm_available() {
        return;
    }
    let empty = std::env::temp_dir().join(format!("livemig-empty-path-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let mut args = vec!["bench", "--vs-qemu", "--json"];
    args.extend(SMALL);
    let out = Command::new(BIN)
        .args(&args)
        .env("PATH", &empty)
        .stdin(Stdio::null())
        .output()
        .expect("run livemig");
    let _ = std::fs::remove_dir(&empty);
    let err = stderr(&out);
    assert!(out.status.success(), "{out:?}");
    let skipped: Vec<&str> = err.lines().filter(|l| l.contains("SKIPPED")).collect();
    assert_eq!(skipped.len(), 1, "{err}");
    assert!(skipped[0].contains(qemu::QEMU_BINARY), "{err}");
    let v = json_of(&out);
    assert_eq!(v["verified"], true, "{v}");
    assert!(v.get("qemu").is_none(), "no QEMU part: {v}");
}

#[test]
fn a_qemu_that_fails_is_an_error_naming_it_with_its_stderr() {
    if !kvm_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("livemig-bad-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join(qemu::QEMU_BINARY);
    std::fs::write(
        &fake,
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'QEMU emulator version 0 (fake)'; exit 0; }\n\
         echo 'fake qemu: no such machine' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::join_paths([dir.as_path(), "/usr/bin".as_ref(), "/bin".as_ref()]).unwrap();
    let mut args = vec!["bench", "--vs-qemu"];
    args.extend(SMALL);
    let out = Command::new(BIN)
        .args(&args)
        .env("PATH", &path)
        .stdin(Stdio::null())
        .output()
        .expect("run livemig");
    let _ = std::fs::remove_dir_all(&dir);
    let err = stderr(&out);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        err.contains("QEMU exited early") && err.contains("fake qemu: no such machine"),
        "{err}"
    );
}
