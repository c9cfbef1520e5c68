//! `cargo xtask`: the README's commands, with the set-up a fresh machine
//! needs done first (the alias lives in `.cargo/config.toml`).
//!
//! - `cargo xtask setup`: installs what building and checking livemig needs
//!   and is missing: libclang (bindgen generates userfaultfd's bindings with
//!   it when `livemig-kvm` builds) and the `x86_64-unknown-none` target (the
//!   core's bare-metal build check), and QEMU (`qemu-system-x86_64`, for
//!   `livemig bench --vs-qemu` and its test; on Debian bookworm from
//!   bookworm-backports, whose suite is added to apt's sources if missing).
//!   Each step is announced before it runs.
//! - `cargo xtask test`: the set-up, then `cargo test --workspace --release`
//!   with `LIVEMIG_REQUIRE_KVM=1` where `/dev/kvm` exists, so a KVM test
//!   that would skip fails instead, and `LIVEMIG_REQUIRE_QEMU=1` (QEMU was
//!   just made sure of). This is what CI runs (`.ci/run`).
//! - `cargo xtask demo [ARGS]`: libclang, then `livemig demo ARGS`.
//!
//! It is a binary of `livemig-tests`, which depends only on the core and
//! the simulation: it builds on a machine that still lacks libclang, which
//! a tool depending on `livemig-kvm` could not.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The Debian package that provides libclang and its headers to bindgen.
const LIBCLANG_PACKAGE: &str = "libclang-dev";
/// The bare-metal target of the core's `no_std` build check.
const BARE_METAL_TARGET: &str = "x86_64-unknown-none";
/// The QEMU `livemig bench --vs-qemu` compares with.
const QEMU_BINARY: &str = "qemu-system-x86_64";
/// The Debian package that provides it.
const QEMU_PACKAGE: &str = "qemu-system-x86";
/// Where QEMU 10 comes from on Debian 12 (bookworm ships QEMU 7.2).
const BACKPORTS_SUITE: &str = "bookworm-backports";
/// The apt source file written when no source lists [`BACKPORTS_SUITE`].
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/backports.sources";
const BACKPORTS_STANZA: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

/// What was asked for on the command line.
#[derive(Debug, PartialEq, Eq)]
enum Job {
    Setup,
    Test,
    Demo(Vec<String>),
}

/// The job named by `args` (the words after `cargo xtask`).
fn parse(args: &[String]) -> Result<Job, String> {
    match args.split_first() {
        Some((cmd, [])) if cmd == "setup" => Ok(Job::Setup),
        Some((cmd, [])) if cmd == "test" => Ok(Job::Test),
        Some((cmd, rest)) if cmd == "demo" => Ok(Job::Demo(rest.to_vec())),
        Some((cmd, _)) if cmd == "setup" || cmd == "test" => {
            Err(format!("`cargo xtask {cmd}` takes no arguments"))
        }
        Some((cmd, _)) => Err(format!("unknown xtask `{cmd}`")),
        None => Err("no xtask given".into()),
    }
}

fn say(what: &str) {
    eprintln!("xtask: {what}");
}

/// Runs `cmd`, announced; a failure to start it or a non-zero exit is an
/// error naming it.
fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}").replace('"', "");
    say(&format!("running {shown}"));
    let status = cmd
        .status()
        .map_err(|e| format!("could not run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

/// Whether `program args` runs and exits with success (quietly).
fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether bindgen will find a libclang: the Debian package where dpkg
/// exists, else a `libclang*.so*` in `LIBCLANG_PATH`.
fn libclang_present() -> bool {
    if succeeds("dpkg", &["--version"]) {
        return succeeds("dpkg", &["-s", LIBCLANG_PACKAGE]);
    }
    std::env::var_os("LIBCLANG_PATH").is_some_and(|dir| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("libclang") && name.contains(".so")
            })
        })
    })
}

fn ensure_libclang() -> Result<(), String> {
    if libclang_present() {
        return Ok(());
    }
    if !succeeds("apt-get", &["--version"]) {
        return Err(format!(
            "libclang is missing (bindgen needs it to build userfaultfd's bindings) and there \
             is no apt-get here: install libclang (the {LIBCLANG_PACKAGE} package or your \
             system's equivalent) or point LIBCLANG_PATH at it"
        ));
    }
    say(&format!(
        "{LIBCLANG_PACKAGE} is missing (bindgen needs libclang to build userfaultfd's \
         bindings, for postcopy): installing it with apt-get"
    ));
    let root = "(apt-get needs root: run as root, or install it yourself)";
    run(Command::new("apt-get").arg("update"))
        .and_then(|()| run(Command::new("apt-get").args(["install", "-y", LIBCLANG_PACKAGE])))
        .map_err(|e| format!("{e} {root}"))
}

fn ensure_target() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| {
            format!(
                "could not run rustup ({e}): add the {BARE_METAL_TARGET} target to your \
                 toolchain yourself"
            )
        })?;
    let listed = String::from_utf8_lossy(&installed.stdout);
    if listed.lines().any(|l| l.trim() == BARE_METAL_TARGET) {
        return Ok(());
    }
    say(&format!(
        "the {BARE_METAL_TARGET} target is missing (the core's bare-metal build check): \
         adding it with rustup"
    ));
    run(Command::new("rustup").args(["target", "add", BARE_METAL_TARGET]))
}

/// The system's release codename (`VERSION_CODENAME` of /etc/os-release).
fn os_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
}

/// Whether any apt source (one-line or deb822) names `suite`.
fn apt_lists_suite(suite: &str) -> bool {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources")),
        );
    }
    files.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.split_whitespace().any(|w| w == suite))
        })
    })
}

fn ensure_qemu() -> Result<(), String> {
    if succeeds(QEMU_BINARY, &["--version"]) {
        return Ok(());
    }
    let why = "`livemig bench --vs-qemu` and its test migrate the same guest with QEMU";
    if !succeeds("apt-get", &["--version"]) {
        return Err(format!(
            "{QEMU_BINARY} is missing ({why}) and there is no apt-get here: install QEMU 10 \
             yourself"
        ));
    }
    let root = "(apt-get needs root: run as root, or install it yourself)";
    let mut install = Command::new("apt-get");
    install.args(["install", "-y"]);
    if os_codename().as_deref() == Some("bookworm") {
        if !apt_lists_suite(BACKPORTS_SUITE) {
            say(&format!(
                "adding the {BACKPORTS_SUITE} suite to apt's sources ({BACKPORTS_SOURCES})"
            ));
            std::fs::write(BACKPORTS_SOURCES, BACKPORTS_STANZA)
                .map_err(|e| format!("could not write {BACKPORTS_SOURCES}: {e} {root}"))?;
        }
        install.args(["-t", BACKPORTS_SUITE]);
    }
    install.arg(QEMU_PACKAGE);
    say(&format!(
        "{QEMU_BINARY} is missing ({why}): installing {QEMU_PACKAGE} with apt-get"
    ));
    run(Command::new("apt-get").arg("update"))
        .and_then(|()| run(&mut install))
        .map_err(|e| format!("{e} {root}"))?;
    if succeeds(QEMU_BINARY, &["--version"]) {
        Ok(())
    } else {
        Err(format!(
            "{QEMU_PACKAGE} was installed but {QEMU_BINARY} --version still fails"
        ))
    }
}

/// The workspace root: this package lives in its `tests/`.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `cargo` as the caller ran it (cargo sets `CARGO` for `cargo run`).
fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn job(job: Job) -> Result<(), String> {
    match job {
        Job::Setup => ensure_libclang()
            .and_then(|()| ensure_target())
            .and_then(|()| ensure_qemu()),
        Job::Test => {
            ensure_libclang()?;
            ensure_target()?;
            ensure_qemu()?;
            let mut test = cargo();
            test.args(["test", "--workspace", "--release"]);
            // QEMU is there now: a --vs-qemu test that would skip fails.
            test.env("LIVEMIG_REQUIRE_QEMU", "1");
            if Path::new("/dev/kvm").exists() {
                // A KVM test that skips on a KVM host hides a broken
                // machine: make it a failure.
                test.env("LIVEMIG_REQUIRE_KVM", "1");
                say("/dev/kvm exists: LIVEMIG_REQUIRE_KVM=1 (a KVM test may not skip)");
            } else {
                say("WARNING: /dev/kvm is missing: the KVM tests will be SKIPPED");
            }
            run(&mut test)
        }
        Job::Demo(args) => {
            ensure_libclang()?;
            run(cargo()
                .args([
                    "run",
                    "--release",
                    "-p",
                    "livemig-cli",
                    "--bin",
                    "livemig",
                    "--",
                ])
                .arg("demo")
                .args(args))
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = parse(&args).map_err(|e| {
        format!("{e}\nusage: cargo xtask setup | cargo xtask test | cargo xtask demo [ARGS]")
    });
    match parsed.and_then(job) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&e);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn jobs_are_parsed_and_demo_arguments_passed_through() {
        assert_eq!(parse(&words("setup")), Ok(Job::Setup));
        assert_eq!(parse(&words("test")), Ok(Job::Test));
        assert_eq!(
            parse(&words("demo --mem-mib 64 --json")),
            Ok(Job::Demo(words("--mem-mib 64 --json")))
        );
        assert_eq!(parse(&words("demo")), Ok(Job::Demo(Vec::new())));
        assert!(
            parse(&words("test --all"))
                .unwrap_err()
                .contains("no arguments")
        );
        assert!(
            parse(&words("bench"))
                .unwrap_err()
                .contains("unknown xtask `bench`")
        );
        assert!(parse(&[]).is_err());
        assert!(workspace_root().join("Cargo.toml").exists());
    }
}
