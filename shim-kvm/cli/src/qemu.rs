//! The demo guest under QEMU, migrated by QEMU: the other side of
//! `livemig bench --vs-qemu`.
//!
//! Both QEMUs run the very bytes of [`guest::IMAGE`] as a multiboot kernel
//! (`-kernel`), with the parameter block loaded at [`guest::PARAM_ADDR`] by
//! `-device loader,...,force-raw=on` and [`GuestParams::start_aps`] set:
//! QEMU's firmware starts vCPU 0 only, which wakes the others (see
//! `guest/README.md`). Under PVM, `-cpu host` needs `-arch-capabilities`
//! (QEMU cannot write that MSR there). The destination waits with
//! `-incoming defer` and listens with `migrate-incoming` on
//! `tcp:127.0.0.1:0`; the source migrates there over QMP with the same
//! downtime limit and bandwidth as livemig.
//!
//! What is checked: `query-migrate` says `completed`, the destination's
//! `query-status` says `running`, and every vCPU of the destination guest
//! stamped pages past where it stood on the stopped source (its stamp
//! counter, read with HMP `xp`). QEMU's side is not digest-checked: QEMU
//! has no memory digest, and the guest's own MISMATCH port is not a device
//! in QEMU.
//!
//! Every wait has a deadline; both QEMUs are killed when their
//! `QemuProcess` drops, on every exit path (an error, Ctrl-C through
//! [`Cancel`]).

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::demo::GuestShape;
use crate::guest::{self, GuestParams};
use crate::interrupt::Cancel;
use crate::qmp::{Qmp, QmpError};

/// The QEMU binary looked for on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// How long QEMU may take to create its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the guest may take to write its first serial line (SeaBIOS
/// runs in ring 0, which PVM emulates: 5-8 s on an idle machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a migration may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the destination may take to run the guest after completion.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `query-migrate` and the other waits poll.
const POLL: Duration = Duration::from_millis(5);

/// Which of the two QEMUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The QEMU that boots the guest and migrates it.
    Source,
    /// The QEMU that waits with `-incoming defer`.
    Destination,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }
}

/// Why a QEMU run failed.
#[derive(Debug)]
pub enum QemuError {
    /// The run's files (image, parameter block, temporary directory) could
    /// not be written.
    Files(io::Error),
    /// The guest shape does not make a parameter block.
    Guest(String),
    /// QEMU could not be started.
    Spawn {
        /// Which QEMU.
        role: Role,
        /// Why.
        error: io::Error,
    },
    /// QEMU exited before the run was over.
    Exited {
        /// Which QEMU.
        role: Role,
        /// How it ended.
        status: ExitStatus,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// A QMP exchange failed.
    Qmp {
        /// Which QEMU.
        role: Role,
        /// What failed.
        error: QmpError,
        /// What it wrote to stderr so far.
        stderr: String,
    },
    /// A wait ran past its deadline.
    Timeout {
        /// Which QEMU.
        role: Role,
        /// What was waited for.
        what: &'static str,
        /// What it wrote to stderr so far.
        stderr: String,
    },
    /// A QMP answer lacked a field or held something unexpected.
    Reply {
        /// Which QEMU.
        role: Role,
        /// What was wrong.
        what: String,
    },
    /// The migration ended without completing.
    Migration {
        /// `query-migrate`'s status.
        status: String,
        /// `query-migrate`'s error-desc, if any.
        error_desc: Option<String>,
    },
    /// The destination guest did not go on: a vCPU's stamp counter did not
    /// move past the source's within 10 s.
    NotContinued {
        /// The vCPU.
        vcpu: u32,
        /// Its counter on the stopped source.
        source: u64,
        /// Its counter on the destination, after the run.
        destination: u64,
    },
    /// Ctrl-C or SIGTERM.
    Cancelled,
}

impl fmt::Display for QemuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tail = |stderr: &str| {
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!("; its stderr: {}", stderr.trim())
            }
        };
        match self {
            QemuError::Files(e) => write!(f, "QEMU run files: {e}"),
            QemuError::Guest(e) => write!(f, "QEMU guest: {e}"),
            QemuError::Spawn { role, error } => {
                write!(
                    f,
                    "could not start the {} {QEMU_BINARY}: {error}",
                    role.name()
                )
            }
            QemuError::Exited {
                role,
                status,
                stderr,
            } => write!(
                f,
                "the {} QEMU exited early ({status}){}",
                role.name(),
                tail(stderr)
            ),
            QemuError::Qmp {
                role,
                error,
                stderr,
            } => write!(f, "the {} QEMU: {error}{}", role.name(), tail(stderr)),
            QemuError::Timeout { role, what, stderr } => write!(
                f,
                "the {} QEMU: timed out waiting for {what}{}",
                role.name(),
                tail(stderr)
            ),
            QemuError::Reply { role, what } => {
                write!(f, "the {} QEMU answered unexpectedly: {what}", role.name())
            }
            QemuError::Migration { status, error_desc } => write!(
                f,
                "the QEMU migration ended {status}{}",
                error_desc
                    .as_deref()
                    .map_or(String::new(), |d| format!(": {d}"))
            ),
            QemuError::NotContinued {
                vcpu,
                source,
                destination,
            } => write!(
                f,
                "the guest did not go on under the destination QEMU: vCPU {vcpu} stamped \
                 {destination} pages there after 10 s, {source} at the stop"
            ),
            QemuError::Cancelled => write!(f, "the QEMU run was cancelled"),
        }
    }
}

impl std::error::Error for QemuError {}

/// Where `qemu-system-x86_64` is on `PATH`, if it is.
pub fn find_qemu() -> Option<PathBuf> {
    find_in(&std::env::var_os("PATH")?)
}

/// The first executable [`QEMU_BINARY`] in the directories of `path`.
fn find_in(path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(QEMU_BINARY))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The first line of `qemu --version` (e.g. `QEMU emulator version 10.0.2 ...`).
pub fn qemu_version(qemu: &Path) -> Result<String, QemuError> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|error| QemuError::Spawn {
            role: Role::Source,
            error,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

/// The files one run shares between its two QEMUs, in a directory of its
/// own that is removed on drop.
struct RunDir(PathBuf);

impl RunDir {
    fn new(params: &GuestParams) -> Result<RunDir, QemuError> {
        static RUN: AtomicU32 = AtomicU32::new(0);
        let n = RUN.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("livemig-qemu-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).map_err(QemuError::Files)?;
        let run = RunDir(dir);
        fs::write(run.file("demo.bin"), guest::IMAGE).map_err(QemuError::Files)?;
        fs::write(run.file("params.bin"), params.encode()).map_err(QemuError::Files)?;
        Ok(run)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running QEMU and its QMP session; killed and reaped on drop.
struct QemuProcess {
    role: Role,
    child: Child,
    qmp: Option<Qmp>,
    stderr: PathBuf,
    serial: PathBuf,
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl QemuProcess {
    /// Starts `qemu` for `shape` with the run's files, and connects to its
    /// QMP socket.
    fn start(
        qemu: &Path,
        role: Role,
        shape: GuestShape,
        dir: &RunDir,
        cancel: &Cancel,
    ) -> Result<QemuProcess, QemuError> {
        let name = role.name();
        let qmp_path = dir.file(&format!("{name}.qmp"));
        let stderr = dir.file(&format!("{name}.stderr"));
        let serial = dir.file(&format!("{name}.serial"));
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut cmd = Command::new(qemu);
        cmd.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"])
            .args(["-machine", "pc", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-monitor", "none"])
            .args(["-m", &format!("{}M", shape.mem_mib)])
            .args(["-smp", &shape.vcpus.to_string()])
            .args(["-serial", &format!("file:{}", path(&serial))])
            .args(["-kernel", &path(&dir.file("demo.bin"))])
            .args([
                "-device",
                &format!(
                    "loader,file={},addr={:#x},force-raw=on",
                    path(&dir.file("params.bin")),
                    guest::PARAM_ADDR
                ),
            ])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", path(&qmp_path)),
            ]);
        if role == Role::Destination {
            cmd.args(["-incoming", "defer"]);
        }
        let err_file = File::create(&stderr).map_err(QemuError::Files)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()
            .map_err(|error| QemuError::Spawn { role, error })?;
        let mut p = QemuProcess {
            role,
            child,
            qmp: None,
            stderr,
            serial,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            p.check_alive()?;
            if qmp_path.exists() {
                match Qmp::connect(&qmp_path) {
                    Ok(q) => {
                        p.qmp = Some(q);
                        return Ok(p);
                    }
                    // Created but not listening yet.
                    Err(QmpError::Io { .. }) => {}
                    Err(error) => return Err(p.qmp_error(error)),
                }
            }
            p.tick(deadline, "its QMP socket", cancel)?;
        }
    }

    fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn qmp_error(&self, error: QmpError) -> QemuError {
        QemuError::Qmp {
            role: self.role,
            error,
            stderr: self.stderr_text(),
        }
    }

    /// An error if QEMU has exited.
    fn check_alive(&mut self) -> Result<(), QemuError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(QemuError::Exited {
                role: self.role,
                status,
                stderr: self.stderr_text(),
            }),
            _ => Ok(()),
        }
    }

    /// One poll interval of a wait for `what` until `deadline`.
    fn tick(
        &mut self,
        deadline: Instant,
        what: &'static str,
        cancel: &Cancel,
    ) -> Result<(), QemuError> {
        if cancel.is_cancelled() {
            return Err(QemuError::Cancelled);
        }
        if Instant::now() > deadline {
            return Err(QemuError::Timeout {
                role: self.role,
                what,
                stderr: self.stderr_text(),
            });
        }
        std::thread::sleep(POLL);
        Ok(())
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QemuError> {
        let result = match self.qmp.as_mut() {
            Some(q) => q.execute(command, arguments),
            None => Err(QmpError::Closed {
                command: command.into(),
            }),
        };
        result.map_err(|e| self.qmp_error(e))
    }

    /// Every vCPU's stamp counter ([`guest::stamped_addr`]).
    fn stamp_counters(&mut self, vcpus: u32) -> Result<Vec<u64>, QemuError> {
        let mut out = Vec::new();
        for v in 0..vcpus {
            let read = match self.qmp.as_mut() {
                Some(q) => q.read_u64(guest::stamped_addr(v)),
                None => Err(QmpError::Closed {
                    command: "xp".into(),
                }),
            };
            out.push(read.map_err(|e| self.qmp_error(e))?);
        }
        Ok(out)
    }

    /// `query-status`'s `status`.
    fn run_state(&mut self) -> Result<String, QemuError> {
        let r = self.execute("query-status", None)?;
        r.get("status")
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| QemuError::Reply {
                role: self.role,
                what: format!("query-status without a status: {r}"),
            })
    }
}

/// One QEMU migration, as `query-migrate` reported it at completion.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuRun {
    /// `query-migrate`'s `status` (`completed`: [`run_once`] returns no
    /// other).
    pub status: String,
    /// `total-time`, ms.
    pub total_ms: f64,
    /// `downtime`, ms: on the source, from the vCPU stop to the end of the
    /// migration.
    pub downtime_ms: f64,
    /// `setup-time`, ms.
    pub setup_ms: f64,
    /// `ram.transferred`, bytes.
    pub transferred: u64,
    /// `ram.total`, bytes.
    pub ram_total: u64,
    /// The destination's `query-status` after completion.
    pub destination_status: String,
    /// Pages the guest stamped after the stop, on the destination, summed
    /// over its vCPUs (every vCPU stamped some: checked).
    pub stamped_after: u64,
}

impl QemuRun {
    /// This run as one JSON object (QEMU's field names).
    pub fn to_json(&self) -> Value {
        json!({
            "status": self.status,
            "total-time": self.total_ms,
            "downtime": self.downtime_ms,
            "setup-time": self.setup_ms,
            "transferred": self.transferred,
            "ram-total": self.ram_total,
            "destination-status": self.destination_status,
            "stamped-after-stop": self.stamped_after,
        })
    }
}

/// The migration settings both sides get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuSettings {
    /// `downtime-limit`, ms.
    pub downtime_limit_ms: u64,
    /// `max-bandwidth`, bytes/s (0 = unlimited, in QEMU 8.1 and later too).
    pub max_bandwidth: u64,
    /// How long the guest runs before the migration starts (counted from
    /// its first serial line).
    pub warmup: Duration,
    /// How long the destination guest runs before it is checked.
    pub run_for: Duration,
}

/// Boots `shape` under `qemu`, lets it run for the warmup, migrates it to a
/// second QEMU over loopback TCP and checks the destination runs it on.
pub fn run_once(
    qemu: &Path,
    shape: GuestShape,
    settings: QemuSettings,
    cancel: &Cancel,
) -> Result<QemuRun, QemuError> {
    let params = GuestParams {
        start_aps: true,
        ..shape
            .params()
            .map_err(|e| QemuError::Guest(e.to_string()))?
    };
    let dir = RunDir::new(&params)?;
    let mut dst = QemuProcess::start(qemu, Role::Destination, shape, &dir, cancel)?;
    let mut src = QemuProcess::start(qemu, Role::Source, shape, &dir, cancel)?;
    dst.execute(
        "migrate-incoming",
        Some(json!({ "uri": "tcp:127.0.0.1:0" })),
    )?;
    let port = incoming_port(&mut dst)?;

    wait_booted(&mut src, &params, settings.warmup, cancel)?;
    src.execute(
        "migrate-set-parameters",
        Some(json!({
            "downtime-limit": settings.downtime_limit_ms,
            "max-bandwidth": settings.max_bandwidth,
        })),
    )?;
    src.execute(
        "migrate",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
    )?;
    let info = wait_migrated(&mut src, cancel)?;
    let field = |path: &[&str]| {
        let mut v = &info;
        for k in path {
            v = v.get(*k)?;
        }
        v.as_f64()
    };
    let missing = |name: &str| QemuError::Reply {
        role: Role::Source,
        what: format!("query-migrate without {name}: {info}"),
    };
    let status = info
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let total_ms = field(&["total-time"]).ok_or_else(|| missing("total-time"))?;
    let downtime_ms = field(&["downtime"]).ok_or_else(|| missing("downtime"))?;
    let setup_ms = field(&["setup-time"]).ok_or_else(|| missing("setup-time"))?;
    let transferred = field(&["ram", "transferred"]).ok_or_else(|| missing("ram.transferred"))?;
    let ram_total = field(&["ram", "total"]).ok_or_else(|| missing("ram.total"))?;

    let at_stop = src.stamp_counters(params.vcpus)?;
    let deadline = Instant::now() + RUNNING_TIMEOUT;
    let destination_status = loop {
        dst.check_alive()?;
        let s = dst.run_state()?;
        if s == "running" {
            break s;
        }
        dst.tick(deadline, "the guest to run after the migration", cancel)?;
    };
    sleep_cancellable(settings.run_for, cancel)?;
    // A loaded machine may not have scheduled a vCPU yet: poll, with a
    // deadline, until each vCPU that owns pages has stamped some.
    let deadline = Instant::now() + RUNNING_TIMEOUT;
    let stamped_after = loop {
        dst.check_alive()?;
        let after = dst.stamp_counters(params.vcpus)?;
        let stalled = (0u32..)
            .zip(at_stop.iter().zip(&after))
            .find(|&(v, (s, d))| {
                guest::owned_pages(params.ws_pages, params.vcpus, v) > 0 && d <= s
            });
        match stalled {
            None => {
                break at_stop
                    .iter()
                    .zip(&after)
                    .map(|(s, d)| d.saturating_sub(*s))
                    .sum::<u64>();
            }
            Some((vcpu, (&source, &destination))) if Instant::now() > deadline => {
                return Err(QemuError::NotContinued {
                    vcpu,
                    source,
                    destination,
                });
            }
            Some(_) => dst.tick(
                deadline,
                "the guest to stamp pages after the migration",
                cancel,
            )?,
        }
    };
    if params.ws_pages == 0 {
        // An idle guest stamps nothing: its serial line shows it runs.
        wait_serial_grows(&mut dst, cancel)?;
    }
    Ok(QemuRun {
        status,
        total_ms,
        downtime_ms,
        setup_ms,
        transferred: transferred as u64,
        ram_total: ram_total as u64,
        destination_status,
        stamped_after,
    })
}

/// The port the destination listens on after `migrate-incoming` on port 0:
/// `query-migrate`'s `socket-address`.
fn incoming_port(dst: &mut QemuProcess) -> Result<u16, QemuError> {
    let info = dst.execute("query-migrate", None)?;
    info.get("socket-address")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(|s| s.get("port"))
        .and_then(|p| {
            p.as_str()
                .and_then(|s| s.parse().ok())
                .or(p.as_u64().and_then(|n| u16::try_from(n).ok()))
        })
        .ok_or_else(|| QemuError::Reply {
            role: Role::Destination,
            what: format!("query-migrate without the listening port: {info}"),
        })
}

/// Waits for the guest's first serial line, then `warmup`, and at least
/// until every vCPU that owns pages has stamped a whole generation (as the
/// livemig demo does before it migrates).
fn wait_booted(
    src: &mut QemuProcess,
    params: &GuestParams,
    warmup: Duration,
    cancel: &Cancel,
) -> Result<(), QemuError> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while fs::metadata(&src.serial).map_or(0, |m| m.len()) == 0 {
        src.check_alive()?;
        src.tick(deadline, "the guest's first serial line", cancel)?;
    }
    let booted = Instant::now();
    loop {
        src.check_alive()?;
        let counters = src.stamp_counters(params.vcpus)?;
        let generation_done = (0u32..)
            .zip(&counters)
            .all(|(v, &c)| c >= u64::from(guest::owned_pages(params.ws_pages, params.vcpus, v)));
        if generation_done && booted.elapsed() >= warmup {
            return Ok(());
        }
        src.tick(deadline, "a first generation of every vCPU", cancel)?;
    }
}

/// Polls `query-migrate` until the migration is over; returns its answer
/// when it completed.
fn wait_migrated(src: &mut QemuProcess, cancel: &Cancel) -> Result<Value, QemuError> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = src.execute("query-migrate", None)?;
        let status = info
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match status.as_str() {
            "completed" => return Ok(info),
            "failed" | "cancelled" => {
                return Err(QemuError::Migration {
                    status,
                    error_desc: info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .map(String::from),
                });
            }
            _ => {}
        }
        if cancel.is_cancelled() {
            let _ = src.execute("migrate_cancel", None);
            return Err(QemuError::Cancelled);
        }
        src.check_alive()?;
        src.tick(deadline, "the migration to complete", cancel)?;
    }
}

/// Waits until the destination guest writes to its serial port.
fn wait_serial_grows(dst: &mut QemuProcess, cancel: &Cancel) -> Result<(), QemuError> {
    let len = |p: &QemuProcess| fs::metadata(&p.serial).map_or(0, |m| m.len());
    let start = len(dst);
    let deadline = Instant::now() + RUNNING_TIMEOUT;
    while len(dst) <= start {
        dst.check_alive()?;
        dst.tick(
            deadline,
            "the guest's serial line after the migration",
            cancel,
        )?;
    }
    Ok(())
}

fn sleep_cancellable(d: Duration, cancel: &Cancel) -> Result<(), QemuError> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if cancel.is_cancelled() {
            return Err(QemuError::Cancelled);
        }
        std::thread::sleep(POLL.min(end.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_qemu_and_carry_its_stderr() {
        let e = QemuError::Timeout {
            role: Role::Destination,
            what: "its QMP socket",
            stderr: "qemu: boom\n".into(),
        };
        assert_eq!(
            e.to_string(),
            "the destination QEMU: timed out waiting for its QMP socket; its stderr: qemu: boom"
        );
        let e = QemuError::Migration {
            status: "failed".into(),
            error_desc: Some("socket closed".into()),
        };
        assert_eq!(
            e.to_string(),
            "the QEMU migration ended failed: socket closed"
        );
    }

    #[test]
    fn qemu_is_found_only_as_an_executable_on_the_path() {
        let dir = std::env::temp_dir().join(format!("livemig-path-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let bin = dir.join(QEMU_BINARY);
        fs::write(&bin, b"").unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(find_in(dir.as_os_str()), None, "not executable");
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([Path::new("/nonexistent"), &dir]).unwrap();
        assert_eq!(find_in(&path), Some(bin));
        assert_eq!(find_in(OsStr::new("/nonexistent")), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
