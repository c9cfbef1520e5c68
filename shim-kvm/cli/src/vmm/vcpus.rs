//! The demo VMM's vCPUs: one thread each running `KVM_RUN`, handling the
//! demo guest's port exits and COM1, with pause and resume for livemig
//! ([`livemig_kvm::vmm::Vcpus`]).
//!
//! A pause kicks each thread out of `KVM_RUN` with a real-time signal whose
//! handler sets `kvm_run.immediate_exit` (so a kick that lands just before
//! `KVM_RUN` is not lost); the thread then re-enters once with
//! `immediate_exit` set so KVM completes the pending port I/O (the register
//! state is only consistent after that), and parks. While a vCPU is parked
//! the VMM owns its fd.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::guest;
use kvm_ioctls::{VcpuExit, VcpuFd};
use livemig_kvm::vmm::{Vcpus, VmmError};
use vm_superio::serial::Error as SerialError;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use super::DemoMemory;
use super::serial::SerialPort;

/// How often a pause re-sends the kick while waiting for a vCPU to park.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

/// Why a vCPU thread stopped, or a vCPU operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuError {
    /// A KVM ioctl failed (operation name and errno).
    Kvm(&'static str, i32),
    /// The guest used a port nothing decodes (direction, port).
    UnexpectedPort(&'static str, u16),
    /// The guest accessed guest-physical `addr` as MMIO: no device is there.
    Mmio {
        /// Guest-physical address.
        addr: u64,
    },
    /// The guest triple-faulted at this rip.
    GuestShutdown {
        /// Guest rip when the shutdown was reported.
        rip: u64,
    },
    /// KVM could not run the guest (typically an instruction it could not
    /// emulate): suberror and rip.
    Internal {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// Guest rip.
        rip: u64,
    },
    /// Any other exit, by its debug name.
    UnexpectedExit(String),
    /// The vCPU thread has stopped (with the error it stopped on; none:
    /// the guest halted).
    Stopped {
        /// vCPU index.
        index: usize,
        /// What stopped it.
        error: Option<Box<VcpuError>>,
    },
    /// The operation needs a parked vCPU.
    NotPaused(usize),
    /// There is no vCPU with this index.
    NoSuchVcpu(usize),
    /// Spawning a vCPU thread failed (errno).
    Spawn(i32),
    /// COM1 could not raise its interrupt or take a byte (errno).
    Serial(i32),
}

impl fmt::Display for VcpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VcpuError::Kvm(op, e) => write!(f, "vCPU {op} failed: errno {e}"),
            VcpuError::UnexpectedPort(dir, p) => {
                write!(f, "guest used port {p:#x} ({dir}), which no device decodes")
            }
            VcpuError::Mmio { addr } => write!(f, "guest accessed MMIO at {addr:#x}: no device"),
            VcpuError::GuestShutdown { rip } => {
                write!(f, "guest triple-faulted (shutdown exit) at rip {rip:#x}")
            }
            VcpuError::Internal { suberror, rip } => {
                write!(
                    f,
                    "KVM internal error, suberror {suberror}, at rip {rip:#x}"
                )
            }
            VcpuError::UnexpectedExit(e) => write!(f, "unexpected vCPU exit: {e}"),
            VcpuError::Stopped { index, error: None } => {
                write!(f, "vCPU {index} has stopped (guest halted)")
            }
            VcpuError::Stopped {
                index,
                error: Some(e),
            } => write!(f, "vCPU {index} has stopped: {e}"),
            VcpuError::NotPaused(i) => write!(f, "vCPU {i} must be paused for this operation"),
            VcpuError::NoSuchVcpu(i) => write!(f, "there is no vCPU {i}"),
            VcpuError::Spawn(e) => write!(f, "spawning a vCPU thread: errno {e}"),
            VcpuError::Serial(e) => write!(f, "serial port I/O failed: errno {e}"),
        }
    }
}

impl std::error::Error for VcpuError {}

/// What one vCPU's guest code has reported through its ports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuReport {
    /// `None` before the BOOTED exit; `Some(true)` if the guest used the
    /// parameter block.
    pub booted: Option<bool>,
    /// PROGRESS exits seen.
    pub progress_exits: u64,
    /// Last generation reported (0 before the first).
    pub generation: u64,
    /// Page indices the guest reported as mismatched.
    pub mismatches: Vec<u32>,
}

#[derive(Default)]
struct Counters {
    booted: AtomicU32,
    progress_exits: AtomicU64,
    generation: AtomicU64,
    mismatches: Mutex<Vec<u32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Parked,
    Stopped,
}

struct Control {
    want: Want,
    state: RunState,
    error: Option<VcpuError>,
}

/// One vCPU, shared between its thread and the VMM.
struct Shared {
    index: usize,
    /// The kernel's thread id of the vCPU thread (0 until it started).
    tid: AtomicI32,
    /// Percent of its time the vCPU is held back (auto-converge), 0 ..= 99.
    throttle: AtomicU8,
    fd: Mutex<VcpuFd>,
    pause_requested: AtomicBool,
    control: Mutex<Control>,
    cv: Condvar,
    counters: Counters,
    serial: SerialPort,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain flags and counters: a panic while holding these locks cannot
    // leave them inconsistent, so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU running on this thread.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer was set by this thread's vCPU loop to the
        // `immediate_exit` byte of its mmap'd `kvm_run`, which outlives the
        // loop (the thread holds the `VcpuFd`); a byte store is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// The kick signal: one above livemig-kvm's own vCPU kick (`SIGRTMIN`), so
/// the two VMMs in this tool never replace each other's handler.
fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    static ERRNO: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            ERRNO.store(e.errno(), Ordering::SeqCst);
        }
    });
    match ERRNO.load(Ordering::SeqCst) {
        0 => Ok(()),
        e => Err(VcpuError::Kvm("register kick signal", e)),
    }
}

struct Vcpu {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The VMM's vCPUs, each on its own thread, all created parked.
pub struct DemoVcpus {
    vcpus: Vec<Vcpu>,
    /// Keeps guest RAM mapped while any vCPU can run: its memslots point
    /// into it.
    _memory: Arc<DemoMemory>,
}

impl fmt::Debug for DemoVcpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoVcpus")
            .field("count", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl DemoVcpus {
    /// Starts a parked thread for each of `fds` (vCPU `i` is `fds[i]`),
    /// over the VM whose memslots map `memory`.
    pub fn start(
        fds: Vec<VcpuFd>,
        memory: Arc<DemoMemory>,
        serial: &SerialPort,
    ) -> Result<DemoVcpus, VcpuError> {
        install_kick_handler()?;
        let mut vcpus = DemoVcpus {
            vcpus: Vec::new(),
            _memory: memory,
        };
        for (index, fd) in fds.into_iter().enumerate() {
            let shared = Arc::new(Shared {
                index,
                tid: AtomicI32::new(0),
                throttle: AtomicU8::new(0),
                fd: Mutex::new(fd),
                pause_requested: AtomicBool::new(true),
                control: Mutex::new(Control {
                    want: Want::Pause,
                    state: RunState::Running,
                    error: None,
                }),
                cv: Condvar::new(),
                counters: Counters::default(),
                serial: serial.clone(),
            });
            let s = Arc::clone(&shared);
            let thread = std::thread::Builder::new()
                .name(format!("demo-vcpu{index}"))
                .spawn(move || vcpu_thread(&s))
                .map_err(|e| VcpuError::Spawn(e.raw_os_error().unwrap_or(0)))?;
            vcpus.vcpus.push(Vcpu {
                shared,
                thread: Some(thread),
            });
        }
        for v in &vcpus.vcpus {
            v.wait_parked()?;
        }
        Ok(vcpus)
    }

    /// What vCPU `index` has reported.
    pub fn report(&self, index: usize) -> Result<VcpuReport, VcpuError> {
        let k = &self.get(index)?.shared.counters;
        Ok(VcpuReport {
            booted: match k.booted.load(Ordering::Acquire) {
                0 => None,
                v => Some(v == 2),
            },
            progress_exits: k.progress_exits.load(Ordering::Relaxed),
            generation: k.generation.load(Ordering::Acquire),
            mismatches: lock(&k.mismatches).clone(),
        })
    }

    /// The kernel thread id of each vCPU's thread, by index (known once
    /// [`DemoVcpus::start`] returned): what per-thread figures such as
    /// postcopy blocktime are matched against.
    pub fn thread_ids(&self) -> Vec<i32> {
        self.vcpus
            .iter()
            .map(|v| v.shared.tid.load(Ordering::Acquire))
            .collect()
    }

    /// The first vCPU that has stopped, with what stopped it.
    pub fn stopped(&self) -> Option<VcpuError> {
        self.vcpus.iter().find_map(|v| {
            let c = lock(&v.shared.control);
            (c.state == RunState::Stopped).then(|| v.stopped_error(&c))
        })
    }

    /// Runs `f` on vCPU `index`'s fd, which is only the VMM's while that
    /// vCPU is parked and not about to resume.
    pub fn with_parked<T>(
        &self,
        index: usize,
        f: impl FnOnce(&VcpuFd) -> T,
    ) -> Result<T, VcpuError> {
        let v = self.get(index)?;
        let c = lock(&v.shared.control);
        if c.state != RunState::Parked || c.want != Want::Pause {
            return Err(VcpuError::NotPaused(index));
        }
        // Holding `control` keeps the thread parked while the fd is used.
        let fd = lock(&v.shared.fd);
        Ok(f(&fd))
    }

    fn get(&self, index: usize) -> Result<&Vcpu, VcpuError> {
        self.vcpus.get(index).ok_or(VcpuError::NoSuchVcpu(index))
    }

    /// Stops every vCPU; returns once each is parked outside `KVM_RUN` with
    /// its last port I/O completed (or has stopped: then the first stopped
    /// one is the error).
    pub fn pause(&self) -> Result<(), VcpuError> {
        for v in &self.vcpus {
            let mut c = lock(&v.shared.control);
            if c.want != Want::Exit {
                c.want = Want::Pause;
            }
            v.shared.pause_requested.store(true, Ordering::SeqCst);
            // A vCPU held back by the throttle wakes at once.
            v.shared.cv.notify_all();
        }
        // Every running vCPU is kicked before any is waited for, so that
        // they leave KVM_RUN together rather than one after the other.
        for v in &self.vcpus {
            v.kick_if_running();
        }
        // Every running vCPU is waited for, even after one is found
        // stopped, so none is left inside KVM_RUN behind the error.
        let waited: Vec<_> = self.vcpus.iter().map(Vcpu::wait_parked).collect();
        waited.into_iter().collect()
    }

    /// Lets the parked vCPUs run.
    pub fn resume(&self) -> Result<(), VcpuError> {
        for v in &self.vcpus {
            let c = lock(&v.shared.control);
            if c.state == RunState::Stopped {
                return Err(v.stopped_error(&c));
            }
        }
        for v in &self.vcpus {
            let mut c = lock(&v.shared.control);
            c.want = Want::Run;
            v.shared.pause_requested.store(false, Ordering::SeqCst);
            v.shared.cv.notify_all();
        }
        Ok(())
    }
}

impl Vcpu {
    fn stopped_error(&self, c: &Control) -> VcpuError {
        VcpuError::Stopped {
            index: self.shared.index,
            error: c.error.clone().map(Box::new),
        }
    }

    /// Sends the kick to a vCPU inside (or about to enter) KVM_RUN.
    fn kick_if_running(&self) {
        let c = lock(&self.shared.control);
        if c.state == RunState::Running
            && let Some(t) = &self.thread
        {
            // A failed kick only delays the pause to the next exit.
            let _ = t.kill(kick_signal());
        }
    }

    fn wait_parked(&self) -> Result<(), VcpuError> {
        let mut c = lock(&self.shared.control);
        loop {
            match c.state {
                RunState::Parked => return Ok(()),
                RunState::Stopped => return Err(self.stopped_error(&c)),
                RunState::Running => {
                    let (guard, waited) = self
                        .shared
                        .cv
                        .wait_timeout(c, KICK_INTERVAL)
                        .unwrap_or_else(|p| p.into_inner());
                    c = guard;
                    // The pause kicked it already: kick again only if that
                    // one was missed (it came just before KVM_RUN).
                    if waited.timed_out()
                        && c.state == RunState::Running
                        && let Some(t) = &self.thread
                    {
                        // A failed kick only delays the pause to the next exit.
                        let _ = t.kill(kick_signal());
                    }
                }
            }
        }
    }
}

impl Vcpus for DemoVcpus {
    fn count(&self) -> usize {
        self.vcpus.len()
    }

    fn pause_all(&self) -> Result<(), VmmError> {
        Ok(self.pause()?)
    }

    fn resume_all(&self) -> Result<(), VmmError> {
        Ok(self.resume()?)
    }

    fn with_vcpu(&self, index: usize, f: &mut dyn FnMut(&VcpuFd)) -> Result<(), VmmError> {
        Ok(self.with_parked(index, |fd| f(fd))?)
    }

    fn throttle(&self, percent: u8) -> Result<(), VmmError> {
        for v in &self.vcpus {
            let _c = lock(&v.shared.control);
            v.shared.throttle.store(percent.min(99), Ordering::Relaxed);
            // A vCPU held back wakes to the new share (a lift at once).
            v.shared.cv.notify_all();
        }
        Ok(())
    }

    fn can_throttle(&self) -> bool {
        true
    }

    fn thread_ids(&self) -> Vec<i32> {
        DemoVcpus::thread_ids(self)
    }
}

impl Drop for DemoVcpus {
    fn drop(&mut self) {
        for v in &self.vcpus {
            let mut c = lock(&v.shared.control);
            c.want = Want::Exit;
            v.shared.pause_requested.store(true, Ordering::SeqCst);
            v.shared.cv.notify_all();
        }
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                while !t.is_finished() {
                    let _ = t.kill(kick_signal());
                    std::thread::sleep(KICK_INTERVAL);
                }
                let _ = t.join();
            }
        }
    }
}

fn vcpu_thread(shared: &Shared) {
    // SAFETY: gettid has no arguments and cannot fail.
    shared
        .tid
        .store(unsafe { libc::gettid() }, Ordering::Release);
    let result = run_loop(shared);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    let mut c = lock(&shared.control);
    c.state = RunState::Stopped;
    c.error = result.err();
    shared.cv.notify_all();
}

/// The throttle (auto-converge's, or the shortest-stop rule's): with a
/// throttle of `p` %, once the vCPU has run for at least
/// [`THROTTLE_SLICE`] since `ran_from`, it waits `p / (100 - p)` of that
/// time on its condition variable, so that a pause or a change of the
/// throttle (a lift) ends the wait at once instead of after it. Called
/// between exits: the demo guest's busy vCPUs exit every few hundred pages.
fn hold_back(shared: &Shared, ran_from: &mut Instant) {
    let percent = u32::from(shared.throttle.load(Ordering::Relaxed));
    if percent == 0 {
        *ran_from = Instant::now();
        return;
    }
    let ran = ran_from.elapsed();
    if ran < THROTTLE_SLICE {
        return;
    }
    let until = Instant::now() + ran * percent / (100 - percent);
    let mut c = lock(&shared.control);
    while !shared.pause_requested.load(Ordering::SeqCst)
        && u32::from(shared.throttle.load(Ordering::Relaxed)) == percent
    {
        let now = Instant::now();
        if now >= until {
            break;
        }
        c = shared
            .cv
            .wait_timeout(c, until - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    drop(c);
    *ran_from = Instant::now();
}

/// The granularity of the auto-converge throttle.
const THROTTLE_SLICE: Duration = Duration::from_millis(1);

/// Parks until resumed; returns false when the thread should exit.
fn park(shared: &Shared) -> bool {
    let mut c = lock(&shared.control);
    c.state = RunState::Parked;
    shared.cv.notify_all();
    while c.want == Want::Pause {
        c = shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
    }
    if c.want == Want::Exit {
        return false;
    }
    c.state = RunState::Running;
    true
}

fn run_loop(shared: &Shared) -> Result<(), VcpuError> {
    {
        let mut fd = lock(&shared.fd);
        let p: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(p));
    }
    loop {
        if !park(shared) {
            return Ok(());
        }
        let mut fd = lock(&shared.fd);
        let mut ran_from = Instant::now();
        while !shared.pause_requested.load(Ordering::SeqCst) {
            hold_back(shared, &mut ran_from);
            match fd.run() {
                Ok(VcpuExit::InternalError) => return Err(internal_error(&mut fd)),
                Ok(VcpuExit::Shutdown) => {
                    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
                    return Err(VcpuError::GuestShutdown { rip });
                }
                Ok(exit) => {
                    if !handle_exit(shared, exit)? {
                        return Ok(());
                    }
                }
                Err(e) if e.errno() == libc::EINTR => fd.set_kvm_immediate_exit(0),
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(VcpuError::Kvm("KVM_RUN", e.errno())),
            }
        }
        // Re-enter once with immediate_exit so KVM completes the last port
        // I/O; only then are the registers a consistent snapshot.
        loop {
            fd.set_kvm_immediate_exit(1);
            match fd.run() {
                Err(e) if e.errno() == libc::EINTR => break,
                Err(e) => return Err(VcpuError::Kvm("KVM_RUN (completion)", e.errno())),
                Ok(exit) => {
                    if !handle_exit(shared, exit)? {
                        return Ok(());
                    }
                }
            }
        }
        fd.set_kvm_immediate_exit(0);
    }
}

fn internal_error(fd: &mut VcpuFd) -> VcpuError {
    let run = fd.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, for which KVM fills
    // the `internal` member of the exit union.
    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
    VcpuError::Internal { suberror, rip }
}

/// Handles one exit; returns false when the guest halted.
fn handle_exit(shared: &Shared, exit: VcpuExit<'_>) -> Result<bool, VcpuError> {
    let k = &shared.counters;
    match exit {
        VcpuExit::IoOut(port, data) if SerialPort::decodes(port) => {
            for &b in data {
                shared.serial.write(port, b).map_err(|e| match e {
                    SerialError::Trigger(e) | SerialError::IOError(e) => {
                        VcpuError::Serial(e.raw_os_error().unwrap_or(0))
                    }
                    SerialError::FullFifo => VcpuError::Serial(libc::ENOSPC),
                })?;
            }
            Ok(true)
        }
        VcpuExit::IoIn(port, data) if SerialPort::decodes(port) => {
            data.fill(shared.serial.read(port));
            Ok(true)
        }
        VcpuExit::IoOut(port, data) => {
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            let value = u32::from_le_bytes(v);
            match port {
                guest::PORT_BOOTED => k.booted.store(1 + u32::from(value == 1), Ordering::Release),
                guest::PORT_PROGRESS => {
                    k.progress_exits.fetch_add(1, Ordering::Relaxed);
                }
                guest::PORT_GENERATION => k.generation.store(u64::from(value), Ordering::Release),
                guest::PORT_MISMATCH => lock(&k.mismatches).push(value),
                other => return Err(VcpuError::UnexpectedPort("out", other)),
            }
            Ok(true)
        }
        VcpuExit::IoIn(port, _) => Err(VcpuError::UnexpectedPort("in", port)),
        VcpuExit::Hlt => Ok(false),
        VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) => Err(VcpuError::Mmio { addr }),
        other => Err(VcpuError::UnexpectedExit(format!("{other:?}"))),
    }
}
