//! Helpers shared by the real-KVM tests.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use livemig_cli::guest::GuestParams;
use livemig_kvm::memory::{DEFAULT_SLOT_BYTES, GuestMemory, PAGE_SIZE, RegionLayout};
use livemig_kvm::postcopy::{PostcopyError, PostcopyRam};
use serde_json::Value;

/// Whether `/dev/kvm` can be used. Without it a test skips loudly, unless
/// `LIVEMIG_REQUIRE_KVM=1` (CI on KVM hosts), where skipping is a failure.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("LIVEMIG_REQUIRE_KVM").as_deref() != Ok("1"),
            "LIVEMIG_REQUIRE_KVM=1 but /dev/kvm is not available"
        );
        eprintln!("SKIPPED: /dev/kvm not available");
    }
    ok
}

/// Whether this process may create the full (kernel-fault) userfaultfd
/// postcopy needs, probed on one page. Without it a test skips loudly,
/// unless `LIVEMIG_REQUIRE_KVM=1`.
// Each test crate compiles this module; not every one runs postcopy.
#[allow(dead_code)]
pub fn userfaultfd_available() -> bool {
    register_or_skip(&anonymous_ram(PAGE_SIZE as u64)).is_some()
}

/// `size` bytes of fresh guest RAM from guest-physical 0, in regions of
/// [`DEFAULT_SLOT_BYTES`], mapped by livemig (no VM).
#[allow(dead_code)]
pub fn anonymous_ram(size: u64) -> GuestMemory {
    let layout = RegionLayout::contiguous("pc.ram", size, DEFAULT_SLOT_BYTES).expect("layout");
    GuestMemory::anonymous(&layout).expect("anonymous guest RAM")
}

/// Registers `ram` for postcopy, or returns `None` after a loud skip when
/// this process may not create a full (kernel-fault) userfaultfd; with
/// `LIVEMIG_REQUIRE_KVM=1` that is a failure. Any other error fails the
/// test.
#[allow(dead_code)]
pub fn register_or_skip(ram: &GuestMemory) -> Option<Arc<PostcopyRam>> {
    match PostcopyRam::register(ram.clone()) {
        Ok(pc) => Some(Arc::new(pc)),
        Err(PostcopyError::Create(e)) => {
            assert!(
                std::env::var("LIVEMIG_REQUIRE_KVM").as_deref() != Ok("1"),
                "LIVEMIG_REQUIRE_KVM=1 but userfaultfd is not usable: {e}"
            );
            eprintln!("SKIPPED: userfaultfd not usable: {e}");
            None
        }
        Err(e) => panic!("registering guest RAM for postcopy: {e}"),
    }
}

/// The demo guest with a 4 MiB working set at 2 MiB (pages 512 .. 1536 of
/// slot 0): small enough to dirty-track and copy in a test.
#[allow(dead_code)]
pub fn small_ws() -> GuestParams {
    GuestParams {
        ws_start: 2 << 20,
        ws_pages: 1024,
        ..GuestParams::default()
    }
}

/// [`small_ws`] on `vcpus` vCPUs with the timer and the serial line.
#[allow(dead_code)]
pub fn small_ws_with_devices(vcpus: u32) -> GuestParams {
    GuestParams {
        vcpus,
        devices: true,
        ..small_ws()
    }
}

/// The `livemig` binary of this build.
#[allow(dead_code)]
pub const BIN: &str = env!("CARGO_BIN_EXE_livemig");

/// Runs `livemig` with `args` and no stdin, collecting what it printed.
// Only the tests of the command line tool run it.
#[allow(dead_code)]
pub fn livemig(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run livemig")
}

/// Number of set bits in `words`.
pub fn count_dirty(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Waits for a spawned `livemig` and collects what it printed.
pub fn finish(mut child: Child) -> Output {
    let mut out = Vec::new();
    let mut err = Vec::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_end(&mut out).unwrap();
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_end(&mut err).unwrap();
    }
    Output {
        status: child.wait().unwrap(),
        stdout: out,
        stderr: err,
    }
}

/// What a run printed on stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The last JSON line a run printed on stdout (its summary).
pub fn json_of(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON in stdout {text:?}, stderr {:?}", stderr(out)));
    serde_json::from_str(line).expect("valid JSON")
}

/// The `{"event": ...}` lines a run printed on stdout, by name.
pub fn events(out: &Output, name: &str) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == name)
        .collect()
}

/// The JSON summary of a run that must have exited with success.
pub fn json_of_success(out: &Output) -> Value {
    assert!(out.status.success(), "{out:?}");
    json_of(out)
}

/// `livemig demo --json --quiet` with `flags` added.
pub fn demo(flags: &[&str]) -> Output {
    let args: Vec<&str> = ["demo", "--json", "--quiet"]
        .iter()
        .chain(flags)
        .copied()
        .collect();
    livemig(&args)
}

/// The summary of a `demo` (with `flags`) that must exit with success.
pub fn demo_ok(flags: &[&str]) -> Value {
    json_of_success(&demo(flags))
}

/// `livemig` still running, its stdout and stderr piped for `finish`.
/// It is killed when the test's thread ends, so that a test that panics
/// leaves no `receive` behind waiting for a migration that never comes.
pub fn spawn(args: &[&str]) -> Child {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and
    // only makes one async-signal-safe system call.
    unsafe {
        command.pre_exec(|| {
            // The signal comes when the thread that spawned the child ends
            // (each test runs on a thread of its own).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
    command.spawn().expect("spawn livemig")
}

/// `livemig receive` as a child, with the address it announced.
pub fn spawn_receiver(listen: &str, mem_mib: u64) -> (Child, String) {
    spawn_receiver_with(listen, mem_mib, &[])
}

/// [`spawn_receiver`] with `extra` flags.
pub fn spawn_receiver_with(listen: &str, mem_mib: u64, extra: &[&str]) -> (Child, String) {
    let mem_mib = mem_mib.to_string();
    let mut args = vec![
        "receive",
        "--listen",
        listen,
        "--json",
        "--quiet",
        "--mem-mib",
        &mem_mib,
        "--run-ms",
        "300",
    ];
    args.extend_from_slice(extra);
    let mut child = spawn(&args);
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let addr = announced_address(&mut reader);
    child.stdout = Some(reader.into_inner());
    (child, addr)
}

/// The address a `livemig receive` announces on its first line of stdout
/// (`listening on ADDR`), read from `reader`.
pub fn announced_address(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("receiver said {line:?}"))
        .to_string()
}

/// What `livemig` prints on stderr when the postcopy switchover is done.
pub const SWITCHOVER_LINE: &str = "postcopy switchover: the guest now runs on the destination";

/// `child`'s stderr, line by line as it comes, so that a test can act on
/// a line while the child runs.
pub struct StderrLines {
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line received so far.
    seen: String,
}

impl StderrLines {
    pub fn of(child: &mut Child) -> Self {
        let reader = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in reader.lines() {
                if tx.send(line.unwrap()).is_err() {
                    break;
                }
            }
        });
        StderrLines {
            lines,
            seen: String::new(),
        }
    }

    /// Waits for a line containing `needle`, failing the test if stderr
    /// ends first.
    pub fn wait_for(&mut self, needle: &str) {
        loop {
            let Ok(line) = self.lines.recv() else {
                panic!("stderr ended without {needle:?}: {}", self.seen);
            };
            self.seen.push_str(&line);
            self.seen.push('\n');
            if line.contains(needle) {
                return;
            }
        }
    }

    /// [`finish`] for a child whose stderr is read here: its `stderr` is
    /// every line.
    pub fn finish(mut self, child: Child) -> Output {
        let mut out = finish(child);
        for line in self.lines.iter() {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        out.stderr = self.seen.into_bytes();
        out
    }
}

/// Every vCPU's stamp counter on the destination (`r`, the receiver's
/// summary) moved past its value at the source's stop (`s`, the sender's).
pub fn assert_each_vcpu_went_on(s: &Value, r: &Value) {
    let at_stop = s["guest-stamped-at-stop"]
        .as_array()
        .expect("stamped at stop");
    let after = r["guest-stamped"].as_array().expect("stamped after");
    assert_eq!(at_stop.len(), after.len(), "{s} / {r}");
    for (v, (a, b)) in at_stop.iter().zip(after).enumerate() {
        assert!(
            b.as_u64().unwrap() > a.as_u64().unwrap(),
            "vCPU {v} did not run on at the destination: {s} / {r}"
        );
    }
}

/// A network namespace joined to this one by a veth pair, removed on drop
/// (which removes both ends of the pair): a host across a link that a test
/// can take down or slow down.
#[allow(dead_code)]
pub struct Netns {
    pub name: String,
    /// This namespace's end of the pair.
    pub link: String,
    /// The namespace's end of the pair.
    inner: String,
    /// The address of the other end, inside the namespace.
    pub remote: String,
}

#[allow(dead_code)]
impl Netns {
    /// Creates it, or says why not (the test then skips loudly). Each call
    /// of a process gets its own names and subnet, so tests of one binary
    /// running in parallel do not collide.
    pub fn create() -> Result<Netns, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = std::process::id();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let subnet = (id.wrapping_mul(7).wrapping_add(n)) % 250;
        let ns = Netns {
            name: format!("lmtest{id}-{n}"),
            link: format!("lmA{id}-{n}"),
            inner: format!("lmB{id}-{n}"),
            remote: format!("10.251.{subnet}.2"),
        };
        let local = format!("10.251.{subnet}.1/24");
        let remote = format!("{}/24", ns.remote);
        let steps: [&[&str]; 8] = [
            &["netns", "add", &ns.name],
            &[
                "link", "add", &ns.link, "type", "veth", "peer", "name", &ns.inner,
            ],
            &["link", "set", &ns.inner, "netns", &ns.name],
            &["addr", "add", &local, "dev", &ns.link],
            &["link", "set", &ns.link, "up"],
            &["-n", &ns.name, "addr", "add", &remote, "dev", &ns.inner],
            &["-n", &ns.name, "link", "set", &ns.inner, "up"],
            &["-n", &ns.name, "link", "set", "lo", "up"],
        ];
        for args in steps {
            run_tool("ip", args)?;
        }
        Ok(ns)
    }

    /// Limits both ends of the pair to `rate` (tc's words, e.g. `1gbit`)
    /// with `tbf` and a 100 ms queue: a slow link whose queue holds most of
    /// what a stop waits for.
    pub fn limit_rate(&self, rate: &str) -> Result<(), String> {
        let tbf = [
            "root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms",
        ];
        let here: Vec<&str> = ["qdisc", "add", "dev", &self.link]
            .iter()
            .chain(&tbf)
            .copied()
            .collect();
        run_tool("tc", &here)?;
        let there: Vec<&str> = ["-n", &self.name, "qdisc", "add", "dev", &self.inner]
            .iter()
            .chain(&tbf)
            .copied()
            .collect();
        run_tool("tc", &there)
    }

    /// `livemig args...` inside the namespace, output piped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name, BIN])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn livemig in a namespace")
    }

    /// Takes the link down (`up` false) or up again, from this side.
    pub fn set_link_up(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        let status = Command::new("ip")
            .args(["link", "set", &self.link, state])
            .status()
            .unwrap();
        assert!(status.success(), "ip link set {} {state}", self.link);
    }
}

/// Runs `tool args...` (`ip`, `tc`), or says what it printed.
fn run_tool(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} {}: {}",
            args.join(" "),
            stderr(&out).trim()
        ))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
