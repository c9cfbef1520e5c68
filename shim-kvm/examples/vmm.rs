//! A minimal VMM that live-migrates its guest with livemig-kvm: the shape
//! of what a rust-vmm VMM writes to use the library (see
//! docs/integration.md for the contract behind each step).
//!
//! The VMM owns everything: its `Kvm`, its `VmFd` with an in-kernel
//! irqchip, guest RAM as a vm-memory `GuestMemoryMmap` registered as
//! memslot 0, one thread per vCPU running `KVM_RUN`, and a toy device. It
//! lends views of them to livemig ([`SourceVm`], [`DestinationVm`]), which
//! migrates on a thread of its own.
//!
//! The guest is five bytes of real-mode code: vCPU `i` increments the
//! 32-bit counter at `COUNTERS + 8 * i` forever. Run as root, with
//! `/dev/kvm`:
//!
//! ```text
//! cargo run --release -p livemig-kvm --example vmm -- local
//! cargo run --release -p livemig-kvm --example vmm -- receive tcp:0.0.0.0:4444   # destination
//! cargo run --release -p livemig-kvm --example vmm -- send tcp:DEST:4444         # source
//! ```
//!
//! `local` runs both VMs in this process over loopback TCP and checks that
//! destination memory equals source memory at the stop and that every vCPU
//! goes on counting on the destination; `send` and `receive` print the
//! same digest on both hosts.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, kvm_mp_state, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use livemig_core::config::MigrationConfig;
use livemig_core::status::MigrationStatus;
use livemig_kvm::memory::{GuestMemory, VmMemoryDirtyLog};
use livemig_kvm::transport::{Connection, Listener, MigrationUri};
use livemig_kvm::vmm::{DeviceSection, Vcpus, VmmError};
use livemig_kvm::{DestinationVm, ReceiveOptions, SourceOptions, SourceVm, migrate, receive};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

type Result<T> = std::result::Result<T, VmmError>;
type Ram = GuestMemoryMmap<AtomicBitmap>;

const RAM_BYTES: usize = 16 << 20;
const VCPUS: usize = 2;
const CODE: u64 = 0x1000;
const COUNTERS: u64 = 0x2000;
/// What the source's toy device holds, to be found on the destination.
const TOY_STATE: u64 = 0x70_7900;
/// `inc dword [bx]; jmp $-3`, in 16-bit real mode.
const GUEST: [u8; 5] = [0x66, 0xff, 0x07, 0xeb, 0xfb];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["local"] => local(),
        ["send", uri] => send(Connection::connect(&uri.parse()?)?).map(drop),
        ["receive", uri] => {
            let listener = Listener::bind(&uri.parse()?)?;
            println!("listening on {}", listener.local_uri()?);
            let (vm, _) = receive_into(listener.accept()?)?;
            let before: Vec<u32> = (0..VCPUS).map(|i| vm.counter(i)).collect::<Result<_>>()?;
            thread::sleep(Duration::from_millis(200));
            for (i, then) in before.iter().enumerate() {
                println!("vCPU {i}: {then} -> {} on the destination", vm.counter(i)?);
            }
            Ok(())
        }
        _ => Err("usage: vmm local | send tcp:HOST:PORT | receive tcp:HOST:PORT".into()),
    }
}

/// Both sides in one process: the check that the example really migrates.
fn local() -> Result<()> {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse::<MigrationUri>()?)?;
    let uri = listener.local_uri()?;
    let destination = thread::spawn(move || receive_into(listener.accept()?));
    let (source_digest, at_stop) = send(Connection::connect(&uri)?)?;
    let (vm, digest) = destination.join().map_err(|_| "destination panicked")??;
    if digest != source_digest {
        return Err(format!("memory differs: {source_digest:#x} != {digest:#x}").into());
    }
    if vm.toy.load(Ordering::Relaxed) != TOY_STATE {
        return Err("the toy device's state did not arrive".into());
    }
    thread::sleep(Duration::from_millis(200));
    for (i, stop) in at_stop.iter().enumerate() {
        let now = vm.counter(i)?;
        // The counter wraps at 2^32; 200 ms of emulated code is far less.
        if now.wrapping_sub(*stop) == 0 {
            return Err(format!("vCPU {i} did not continue on the destination").into());
        }
        println!("vCPU {i}: {stop} at the stop, {now} on the destination");
    }
    println!("migrated: memory digest {digest:#x} on both sides, every vCPU continued");
    Ok(())
}

/// Boots the guest, lets it run, migrates it; returns the source's memory
/// digest at the stop and each vCPU's counter then.
fn send(conn: Connection) -> Result<(u64, Vec<u32>)> {
    let vm = Vm::new()?;
    vm.ram.write_slice(&GUEST, GuestAddress(CODE))?;
    vm.toy.store(TOY_STATE, Ordering::Relaxed);
    for i in 0..VCPUS {
        let mut booted = Ok(());
        vm.vcpus.with_vcpu(i, &mut |fd| booted = boot(fd, i))?;
        booted?;
    }
    vm.vcpus.resume_all()?;
    thread::sleep(Duration::from_millis(200));

    let source = SourceVm {
        vm: Arc::clone(&vm.fd),
        memory: vm.memory.clone(),
        vcpus: vm.vcpus.clone(),
        devices: vec![Box::new(Toy(Arc::clone(&vm.toy)))],
        device_dirty: Some(Box::new(VmMemoryDirtyLog::new(&vm.ram))),
        running: true,
    };
    let config = MigrationConfig::default();
    let handle = migrate(source, conn, &config, SourceOptions::default())?;
    while !handle.wait_timeout(Duration::from_millis(100)) {
        let s = handle.stats();
        println!("{:?}: {} bytes sent", s.status, s.ram.transferred);
    }
    let report = handle.join()?;
    if report.stats.status != MigrationStatus::Completed {
        // Nothing to undo: the guest is running here again.
        return Err(format!("migration failed: {}", report.stats.error_desc).into());
    }
    // Completed: the vCPUs stay paused, so memory is what it was at the stop.
    let digest = vm.memory.digest();
    let at_stop = (0..VCPUS).map(|i| vm.counter(i)).collect::<Result<_>>()?;
    println!("source: completed, memory digest {digest:#x}");
    Ok((digest, at_stop))
}

/// Creates an empty VM like the source's and receives the guest into it;
/// returns the VM (its guest running) and the digest of what was loaded.
fn receive_into(conn: Connection) -> Result<(Vm, u64)> {
    let vm = Vm::new()?;
    let toy = Arc::clone(&vm.toy);
    let destination = DestinationVm {
        vm: Arc::clone(&vm.fd),
        memory: vm.memory.clone(),
        vcpus: vm.vcpus.clone(),
        devices: vec![Box::new(Toy(Arc::clone(&vm.toy)))],
        // A VMM with network devices announces them here.
        on_started: Some(Box::new(|| println!("destination: guest started"))),
    };
    // The digest of the loaded memory is this example's check.
    let options = ReceiveOptions {
        digest: true,
        ..ReceiveOptions::default()
    };
    let report = receive(destination, conn, options)?.join()?;
    if let Some(e) = report.error {
        // Nothing ran here: discard the VM.
        return Err(format!("incoming migration failed: {e}").into());
    }
    if !report.started {
        return Err("the guest arrived paused, but it was running on the source".into());
    }
    let digest = report.digest.ok_or("no digest of the loaded memory")?;
    println!(
        "destination: memory digest {digest:#x}, toy device {}",
        toy.load(Ordering::Relaxed)
    );
    Ok((vm, digest))
}

/// One VM: what the VMM owns. Fields drop in order: vCPU threads first,
/// then the VM, then the RAM its memslot points into.
struct Vm {
    vcpus: Arc<ToyVcpus>,
    fd: Arc<VmFd>,
    memory: GuestMemory,
    ram: Ram,
    toy: Arc<AtomicU64>,
}

impl Vm {
    fn new() -> Result<Vm> {
        let kvm = Kvm::new()?;
        let fd = kvm.create_vm()?;
        fd.set_tss_address(0xfffb_d000)?;
        fd.create_irq_chip()?;
        let ram = Ram::from_ranges(&[(GuestAddress(0), RAM_BYTES)])?;
        let host = ram.get_host_address(GuestAddress(0))?;
        let slot = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: RAM_BYTES as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of `ram`'s one mapping of RAM_BYTES,
        // which `Vm` (and livemig's GuestMemory over it) keep mapped until
        // after the vCPU threads and the VmFd are gone.
        unsafe { fd.set_user_memory_region(slot)? };
        let memory = GuestMemory::from_vm_memory(&ram, 0)?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
        let mut fds = Vec::new();
        for i in 0..VCPUS {
            let vcpu = fd.create_vcpu(i as u64)?;
            vcpu.set_cpuid2(&cpuid)?;
            fds.push(vcpu);
        }
        Ok(Vm {
            vcpus: Arc::new(ToyVcpus::start(fds)?),
            fd: Arc::new(fd),
            memory,
            ram,
            toy: Arc::new(AtomicU64::new(0)),
        })
    }

    fn counter(&self, vcpu: usize) -> Result<u32> {
        Ok(self
            .ram
            .read_obj(GuestAddress(COUNTERS + 8 * vcpu as u64))?)
    }
}

/// vCPU `index` at the guest's code in real mode, counting at its address.
fn boot(fd: &VcpuFd, index: usize) -> Result<()> {
    let mut sregs = fd.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    fd.set_sregs(&sregs)?;
    let mut regs = fd.get_regs()?;
    regs.rip = CODE;
    regs.rflags = 2;
    regs.rbx = COUNTERS + 8 * index as u64;
    fd.set_regs(&regs)?;
    // Application processors wait for INIT/SIPI otherwise.
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })?;
    Ok(())
}

/// A device whose whole state is one number: a section of id "toy".
struct Toy(Arc<AtomicU64>);

impl DeviceSection for Toy {
    fn id(&self) -> &str {
        "toy"
    }

    fn version(&self) -> u32 {
        1
    }

    fn save(&mut self, out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(&self.0.load(Ordering::Relaxed).to_le_bytes());
        Ok(())
    }

    fn load(&mut self, _version: u32, data: &[u8]) -> Result<()> {
        let bytes: [u8; 8] = data.try_into().map_err(|_| "toy: state is not 8 bytes")?;
        self.0.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        Ok(())
    }
}

/// The vCPUs: one thread each, in `KVM_RUN` while running, parked (outside
/// it, fd free for livemig) while paused. They start parked.
struct ToyVcpus {
    vcpus: Vec<VcpuThread>,
}

struct VcpuThread {
    shared: Arc<VcpuShared>,
    thread: Option<JoinHandle<()>>,
}

struct VcpuShared {
    fd: Mutex<VcpuFd>,
    /// Whether the VMM wants it running; read by the thread between runs.
    run: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    in_kvm_run: bool,
    exit: bool,
    /// Why the thread stopped for good (an exit this guest never makes).
    stopped: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (`EINTR`).
fn kick() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl ToyVcpus {
    fn start(fds: Vec<VcpuFd>) -> Result<ToyVcpus> {
        register_signal_handler(kick(), on_kick)?;
        let mut vcpus = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            let shared = Arc::new(VcpuShared {
                fd: Mutex::new(fd),
                run: AtomicBool::new(false),
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            });
            let theirs = Arc::clone(&shared);
            let thread = thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_loop(&theirs))?;
            vcpus.push(VcpuThread {
                shared,
                thread: Some(thread),
            });
        }
        Ok(ToyVcpus { vcpus })
    }

    fn set_run(&self, run: bool) -> Result<()> {
        for v in &self.vcpus {
            if let Some(why) = &lock(&v.shared.state).stopped {
                return Err(why.clone().into());
            }
            v.shared.run.store(run, Ordering::SeqCst);
            v.shared.changed.notify_all();
        }
        Ok(())
    }
}

impl Vcpus for ToyVcpus {
    fn count(&self) -> usize {
        self.vcpus.len()
    }

    fn pause_all(&self) -> Result<()> {
        self.set_run(false)?;
        for v in &self.vcpus {
            let mut state = lock(&v.shared.state);
            while state.in_kvm_run {
                // A kick that lands just before KVM_RUN is lost: kick again.
                if let Some(t) = &v.thread {
                    t.kill(kick())?;
                }
                state = v
                    .shared
                    .changed
                    .wait_timeout(state, Duration::from_millis(2))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        Ok(())
    }

    fn resume_all(&self) -> Result<()> {
        self.set_run(true)
    }

    fn with_vcpu(&self, index: usize, f: &mut dyn FnMut(&VcpuFd)) -> Result<()> {
        let v = self.vcpus.get(index).ok_or("no such vCPU")?;
        // Holding the state lock keeps the thread from entering KVM_RUN.
        let state = lock(&v.shared.state);
        if state.in_kvm_run || v.shared.run.load(Ordering::SeqCst) {
            return Err(format!("vCPU {index} is not paused").into());
        }
        f(&lock(&v.shared.fd));
        Ok(())
    }
}

impl Drop for ToyVcpus {
    fn drop(&mut self) {
        for v in &mut self.vcpus {
            lock(&v.shared.state).exit = true;
            v.shared.run.store(false, Ordering::SeqCst);
            v.shared.changed.notify_all();
            if let Some(t) = v.thread.take() {
                while !t.is_finished() {
                    let _ = t.kill(kick());
                    thread::sleep(Duration::from_millis(2));
                }
                let _ = t.join();
            }
        }
    }
}

fn vcpu_loop(v: &VcpuShared) {
    loop {
        let mut state = lock(&v.state);
        while !v.run.load(Ordering::SeqCst) && !state.exit {
            state = v.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.exit {
            return;
        }
        state.in_kvm_run = true;
        drop(state);
        let mut fd = lock(&v.fd);
        let mut stopped = None;
        while v.run.load(Ordering::SeqCst) {
            match fd.run() {
                Err(e) if e.errno() == libc::EINTR => {}
                // This guest makes no I/O, so every exit is a failure.
                Ok(exit) => stopped = Some(format!("vCPU exit {exit:?}")),
                Err(e) => stopped = Some(format!("KVM_RUN: {e}")),
            }
            if stopped.is_some() {
                break;
            }
        }
        drop(fd);
        let mut state = lock(&v.state);
        state.in_kvm_run = false;
        v.changed.notify_all();
        if stopped.is_some() {
            state.stopped = stopped;
            return;
        }
    }
}
