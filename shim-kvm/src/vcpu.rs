//! One vCPU running the demo guest on its own thread, with pause/resume for
//! the stop-and-copy and its register state as a device blob.
//!
//! The vCPU thread runs `KVM_RUN` in a loop and handles the guest's port
//! exits (progress, generation, mismatch), optionally sleeping at progress
//! exits to hold the guest to a target dirty rate. [`Vcpu::pause`] kicks it
//! out of `KVM_RUN` with a real-time signal whose handler sets
//! `kvm_run.immediate_exit` (so a kick that lands just before `KVM_RUN` is
//! not lost), re-enters once with `immediate_exit` set so KVM completes the
//! pending port I/O (the register state is only consistent after that), and
//! parks. While parked the controller owns the vCPU fd: boot setup and state
//! save/load happen only then. There is no in-kernel irqchip (the guest runs
//! with interrupts off), so its state carries no LAPIC.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_segment};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::guest;
use crate::memory::GuestMemory;
use crate::vm::Vm;
use crate::x86::{StateError, VcpuCaps, VcpuState};

/// How often `pause` re-sends the kick while waiting for the vCPU to park.
const KICK_INTERVAL: Duration = Duration::from_millis(2);
/// Longest single throttle sleep, so a pause request is seen quickly.
const THROTTLE_SLICE: Duration = Duration::from_millis(1);

/// Why the vCPU stopped or a vCPU operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuError {
    /// A KVM ioctl failed (operation name and errno).
    Kvm(&'static str, i32),
    /// The guest touched guest-physical `addr` inside RAM and KVM reported
    /// MMIO: the memslot backing it has vanished.
    MemoryVanished {
        /// Guest-physical address.
        addr: u64,
    },
    /// The guest accessed unbacked guest-physical `addr` (outside RAM).
    MmioOutsideRam {
        /// Guest-physical address.
        addr: u64,
    },
    /// The guest wrote to a port the demo guest does not use.
    UnexpectedPort(u16),
    /// The guest triple-faulted (an exception: it has no IDT) at this rip.
    GuestShutdown {
        /// Guest rip when the shutdown was reported.
        rip: u64,
    },
    /// Any other exit reason, by its debug name.
    UnexpectedExit(String),
    /// The operation needs a parked vCPU.
    NotPaused,
    /// The vCPU thread has stopped (with the error it stopped on, if any).
    Stopped(Option<Box<VcpuError>>),
    /// Spawning the vCPU thread failed.
    Spawn(String),
    /// Probing what of the vCPU's state KVM saves failed.
    State(StateError),
}

impl fmt::Display for VcpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VcpuError::Kvm(op, e) => write!(f, "vCPU {op} failed: errno {e}"),
            VcpuError::MemoryVanished { addr } => write!(
                f,
                "guest RAM vanished: MMIO exit at {addr:#x}, inside RAM (memslot missing)"
            ),
            VcpuError::MmioOutsideRam { addr } => {
                write!(f, "guest accessed unbacked address {addr:#x}")
            }
            VcpuError::UnexpectedPort(p) => write!(f, "guest wrote unexpected port {p:#x}"),
            VcpuError::GuestShutdown { rip } => {
                write!(f, "guest triple-faulted (shutdown exit) at rip {rip:#x}")
            }
            VcpuError::UnexpectedExit(e) => write!(f, "unexpected vCPU exit: {e}"),
            VcpuError::NotPaused => f.write_str("vCPU must be paused for this operation"),
            VcpuError::Stopped(None) => f.write_str("vCPU thread has stopped (guest halted)"),
            VcpuError::Stopped(Some(e)) => write!(f, "vCPU thread has stopped: {e}"),
            VcpuError::Spawn(e) => write!(f, "spawning the vCPU thread: {e}"),
            VcpuError::State(e) => write!(f, "probing the vCPU state: {e}"),
        }
    }
}

impl std::error::Error for VcpuError {}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |e| VcpuError::Kvm(op, e.errno())
}

/// What the guest has reported so far (read with [`Vcpu::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// `None` before the BOOTED exit; `Some(true)` if the guest used the
    /// parameter block.
    pub booted: Option<bool>,
    /// Time from the first resume to the BOOTED exit.
    pub boot_time: Option<Duration>,
    /// Pages stamped, summed from PROGRESS deltas seen by this vCPU.
    pub pages_written: u64,
    /// Last generation reported (0 before the first).
    pub generation: u64,
    /// PROGRESS exits seen.
    pub progress_exits: u64,
    /// All exits seen by this vCPU thread.
    pub exits: u64,
    /// Page indices the guest reported as mismatched.
    pub mismatches: Vec<u32>,
}

#[derive(Default)]
struct Counters {
    booted: AtomicU32,
    boot_ns: AtomicU64,
    pages_written: AtomicU64,
    generation: AtomicU64,
    progress_exits: AtomicU64,
    exits: AtomicU64,
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
    first_resume: Option<Instant>,
}

struct Shared {
    fd: Mutex<VcpuFd>,
    pause_requested: AtomicBool,
    control: Mutex<Control>,
    cv: Condvar,
    counters: Counters,
    /// Target dirty rate in pages per second; 0 = unthrottled.
    rate: AtomicU64,
    ram_size: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent (plain
    // flags and counters), so poisoning is ignored.
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
        // loop; a byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
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

/// The guest's one vCPU and the thread that runs it.
pub struct Vcpu {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// What of the vCPU's state this host's KVM saves and restores.
    caps: VcpuCaps,
    /// Keeps the memslots' host memory mapped while the vCPU can touch it.
    _ram: GuestMemory,
}

impl fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu")
            .field("msrs", &self.caps.msrs().indices().len())
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Creates vCPU 0 of `vm` with the host's supported CPUID and starts its
    /// thread parked: set it up ([`Vcpu::setup_boot`] or
    /// [`Vcpu::load_state`]) and then [`Vcpu::resume`] it.
    pub fn new(vm: &Vm) -> Result<Vcpu, VcpuError> {
        install_kick_handler()?;
        let fd = vm.fd.create_vcpu(0).map_err(kvm_err("create_vcpu"))?;
        let cpuid = vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get_supported_cpuid"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("set_cpuid2"))?;
        let caps = VcpuCaps::probe(&vm.kvm, &vm.fd, &fd).map_err(VcpuError::State)?;
        let shared = Arc::new(Shared {
            fd: Mutex::new(fd),
            pause_requested: AtomicBool::new(true),
            control: Mutex::new(Control {
                want: Want::Pause,
                state: RunState::Running,
                error: None,
                first_resume: None,
            }),
            cv: Condvar::new(),
            counters: Counters::default(),
            rate: AtomicU64::new(0),
            ram_size: vm.ram().size(),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("livemig-vcpu0".into())
            .spawn(move || vcpu_thread(&s))
            .map_err(|e| VcpuError::Spawn(e.to_string()))?;
        let vcpu = Vcpu {
            shared,
            thread: Some(thread),
            caps,
            _ram: vm.ram().clone(),
        };
        vcpu.wait_parked()?;
        Ok(vcpu)
    }

    fn wait_parked(&self) -> Result<(), VcpuError> {
        let mut c = lock(&self.shared.control);
        loop {
            match c.state {
                RunState::Parked => return Ok(()),
                RunState::Stopped => return Err(VcpuError::Stopped(c.error.clone().map(Box::new))),
                RunState::Running => {
                    if let Some(t) = &self.thread {
                        // A failed kick only delays the pause to the next exit.
                        let _ = t.kill(kick_signal());
                    }
                    c = self
                        .shared
                        .cv
                        .wait_timeout(c, KICK_INTERVAL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Stops the vCPU and returns once it is parked outside `KVM_RUN` with
    /// its port I/O completed, and how long that took (the vCPU stop time of
    /// a migration's downtime).
    pub fn pause(&self) -> Result<Duration, VcpuError> {
        let start = Instant::now();
        {
            let mut c = lock(&self.shared.control);
            if c.want != Want::Exit {
                c.want = Want::Pause;
            }
            self.shared.pause_requested.store(true, Ordering::SeqCst);
        }
        self.wait_parked()?;
        Ok(start.elapsed())
    }

    /// Lets a parked vCPU run again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        let mut c = lock(&self.shared.control);
        match c.state {
            RunState::Stopped => return Err(VcpuError::Stopped(c.error.clone().map(Box::new))),
            RunState::Running if c.want == Want::Run => return Ok(()),
            _ => {}
        }
        c.want = Want::Run;
        c.first_resume.get_or_insert_with(Instant::now);
        self.shared.pause_requested.store(false, Ordering::SeqCst);
        self.shared.cv.notify_all();
        Ok(())
    }

    /// Sets the dirty-rate throttle in pages per second (0 = off): at each
    /// PROGRESS exit the vCPU thread sleeps while the guest is ahead of it.
    pub fn set_dirty_rate_limit(&self, pages_per_sec: u64) {
        self.shared.rate.store(pages_per_sec, Ordering::Relaxed);
    }

    /// Whether the vCPU thread has stopped, and on what error (`None` inside
    /// = the guest halted).
    pub fn stopped(&self) -> Option<Option<VcpuError>> {
        let c = lock(&self.shared.control);
        (c.state == RunState::Stopped).then(|| c.error.clone())
    }

    /// A snapshot of what the guest has reported.
    pub fn stats(&self) -> GuestStats {
        let k = &self.shared.counters;
        let booted = match k.booted.load(Ordering::Acquire) {
            0 => None,
            v => Some(v == 2),
        };
        GuestStats {
            booted,
            boot_time: booted.map(|_| Duration::from_nanos(k.boot_ns.load(Ordering::Relaxed))),
            pages_written: k.pages_written.load(Ordering::Relaxed),
            generation: k.generation.load(Ordering::Acquire),
            progress_exits: k.progress_exits.load(Ordering::Relaxed),
            exits: k.exits.load(Ordering::Relaxed),
            mismatches: lock(&k.mismatches).clone(),
        }
    }

    /// Runs `f` on the vCPU fd, which is only ours while the vCPU is parked.
    fn with_parked_fd<T, E>(
        &self,
        not_paused: E,
        f: impl FnOnce(&mut VcpuFd) -> Result<T, E>,
    ) -> Result<T, E> {
        let c = lock(&self.shared.control);
        // Parked but already resumed (the thread has not woken yet) counts as
        // running: the registers are about to change.
        if c.state != RunState::Parked || c.want != Want::Pause {
            return Err(not_paused);
        }
        // Holding `control` keeps the thread parked while we use the fd.
        let mut fd = lock(&self.shared.fd);
        let r = f(&mut fd);
        drop(fd);
        drop(c);
        r
    }

    /// Puts a parked vCPU at `entry` in flat 32-bit protected mode, ring 0,
    /// paging off (CS/DS/ES/FS/GS/SS base 0, limit 4 GiB), rflags = 2: the
    /// multiboot entry state without needing a GDT in guest memory.
    pub fn setup_boot(&self, entry: u64) -> Result<(), VcpuError> {
        self.with_parked_fd(VcpuError::NotPaused, |fd| {
            let mut sregs = fd.get_sregs().map_err(kvm_err("get_sregs"))?;
            let flat = |selector: u16, type_: u8| kvm_segment {
                base: 0,
                limit: 0xFFFF_FFFF,
                selector,
                type_,
                present: 1,
                dpl: 0,
                db: 1,
                s: 1,
                l: 0,
                g: 1,
                avl: 0,
                unusable: 0,
                padding: 0,
            };
            sregs.cs = flat(0x08, 0xB);
            let data = flat(0x10, 0x3);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            fd.set_sregs(&sregs).map_err(kvm_err("set_sregs"))?;
            let mut regs = fd.get_regs().map_err(kvm_err("get_regs"))?;
            regs.rip = entry;
            regs.rflags = 2;
            fd.set_regs(&regs).map_err(kvm_err("set_regs"))
        })
    }

    /// Captures the parked vCPU's whole x86 state ([`VcpuState`]) as a
    /// blob for [`Vcpu::load_state`]. The demo VM has no in-kernel irqchip
    /// or PIT; its kvmclock, which the demo guest never enables, is not
    /// carried yet ([`crate::x86::VmState`] is its own section, not yet
    /// sent by `migrate`).
    pub fn save_state(&self) -> Result<Vec<u8>, StateError> {
        self.with_parked_fd(StateError::NotPaused, |fd| {
            let mut blob = Vec::new();
            VcpuState::save(fd, &self.caps)?.encode(&mut blob);
            Ok(blob)
        })
    }

    /// Restores a blob from [`Vcpu::save_state`] into this parked vCPU. The
    /// blob is fully validated before anything is written to KVM.
    pub fn load_state(&self, blob: &[u8]) -> Result<(), StateError> {
        let state = VcpuState::decode(blob)?;
        self.with_parked_fd(StateError::NotPaused, |fd| state.restore(fd, &self.caps))
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        {
            let mut c = lock(&self.shared.control);
            c.want = Want::Exit;
            self.shared.pause_requested.store(true, Ordering::SeqCst);
            self.shared.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            while !t.is_finished() {
                let _ = t.kill(kick_signal());
                std::thread::sleep(KICK_INTERVAL);
            }
            let _ = t.join();
        }
    }
}

fn vcpu_thread(shared: &Shared) {
    let result = run_loop(shared);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    let mut c = lock(&shared.control);
    c.state = RunState::Stopped;
    c.error = result.err();
    shared.cv.notify_all();
}

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

/// Per-thread bookkeeping of the exit handler.
struct Tracker {
    last_progress: Option<u32>,
    throttle_start: Instant,
    throttle_pages: u64,
    throttle_rate: u64,
    started: Option<Instant>,
}

fn run_loop(shared: &Shared) -> Result<(), VcpuError> {
    {
        let mut fd = lock(&shared.fd);
        let p: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(p));
    }
    let mut t = Tracker {
        last_progress: None,
        throttle_start: Instant::now(),
        throttle_pages: 0,
        throttle_rate: 0,
        started: None,
    };
    loop {
        if !park(shared) {
            return Ok(());
        }
        t.started = lock(&shared.control).first_resume;
        t.throttle_start = Instant::now();
        t.throttle_pages = 0;
        let mut fd = lock(&shared.fd);
        while !shared.pause_requested.load(Ordering::SeqCst) {
            match fd.run() {
                Ok(VcpuExit::InternalError) => return Err(internal_error(&mut fd)),
                Ok(VcpuExit::Shutdown) => {
                    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
                    return Err(VcpuError::GuestShutdown { rip });
                }
                Ok(exit) => {
                    shared.counters.exits.fetch_add(1, Ordering::Relaxed);
                    if !handle_exit(shared, &mut t, exit)? {
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
                    if !handle_exit(shared, &mut t, exit)? {
                        return Ok(());
                    }
                }
            }
        }
        fd.set_kvm_immediate_exit(0);
    }
}

/// Describes a `KVM_EXIT_INTERNAL_ERROR` (typically an instruction KVM
/// could not emulate) with its suberror and the guest's rip.
fn internal_error(fd: &mut VcpuFd) -> VcpuError {
    let run = fd.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, for which KVM fills
    // the `internal` member of the exit union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
    VcpuError::UnexpectedExit(format!(
        "internal error, suberror {} data {:x?} at rip {rip:#x}",
        internal.suberror,
        &internal.data[..n]
    ))
}

/// Handles one exit; returns false when the guest halted.
fn handle_exit(shared: &Shared, t: &mut Tracker, exit: VcpuExit<'_>) -> Result<bool, VcpuError> {
    let k = &shared.counters;
    match exit {
        VcpuExit::IoOut(port, data) => {
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            let value = u32::from_le_bytes(v);
            match port {
                guest::PORT_BOOTED => {
                    if let Some(s) = t.started {
                        k.boot_ns
                            .store(s.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                    k.booted.store(1 + u32::from(value == 1), Ordering::Release);
                    t.last_progress = Some(0);
                }
                guest::PORT_PROGRESS => {
                    k.progress_exits.fetch_add(1, Ordering::Relaxed);
                    let delta = t
                        .last_progress
                        .map_or(0, |last| u64::from(value.wrapping_sub(last)));
                    t.last_progress = Some(value);
                    k.pages_written.fetch_add(delta, Ordering::Relaxed);
                    throttle(shared, t, delta);
                }
                guest::PORT_GENERATION => k.generation.store(u64::from(value), Ordering::Release),
                guest::PORT_MISMATCH => lock(&k.mismatches).push(value),
                other => return Err(VcpuError::UnexpectedPort(other)),
            }
            Ok(true)
        }
        VcpuExit::Hlt => Ok(false),
        VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) => {
            if addr < shared.ram_size {
                Err(VcpuError::MemoryVanished { addr })
            } else {
                Err(VcpuError::MmioOutsideRam { addr })
            }
        }
        other => Err(VcpuError::UnexpectedExit(format!("{other:?}"))),
    }
}

/// Sleeps while the guest is ahead of the target rate, in short slices so a
/// pause request is honoured promptly.
fn throttle(shared: &Shared, t: &mut Tracker, delta: u64) {
    let rate = shared.rate.load(Ordering::Relaxed);
    if rate != t.throttle_rate {
        t.throttle_rate = rate;
        t.throttle_start = Instant::now();
        t.throttle_pages = 0;
    }
    if rate == 0 {
        return;
    }
    t.throttle_pages += delta;
    let due = Duration::from_secs_f64(t.throttle_pages as f64 / rate as f64);
    while !shared.pause_requested.load(Ordering::Relaxed) {
        let elapsed = t.throttle_start.elapsed();
        if elapsed >= due {
            break;
        }
        std::thread::sleep((due - elapsed).min(THROTTLE_SLICE));
    }
}
