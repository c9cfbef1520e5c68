//! A small in-process VMM for the migration tests, written against
//! livemig-kvm's public API only: its own `/dev/kvm`, a VM with vm-memory
//! RAM (`GuestMemoryMmap<AtomicBitmap>`, two regions with a hole between
//! them) registered as its memslots, and vCPUs on threads of their own
//! that run `KVM_RUN` and pause and resume on request ([`TestVcpus`]
//! implements [`Vcpus`]).
//!
//! The guest: every vCPU runs the same three 16-bit real-mode instructions
//! at [`CODE_GPA`] — `inc dword [bx]; out 0x80, al; jmp` — with `ds:bx`
//! pointing at its own counter ([`counter_gpa`]), so each vCPU's counter
//! counts its loop iterations and every iteration exits to the vCPU
//! thread, which is where a pause request is seen. No in-kernel irqchip,
//! so every vCPU starts runnable.
#![allow(dead_code)]

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use livemig_kvm::memory::GuestMemory;
use livemig_kvm::{Vcpus, VmmError};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the guest code lives.
pub const CODE_GPA: u64 = 0x1000;
/// `inc dword [bx]; out 0x80, al; jmp $-7`.
const CODE: [u8; 7] = [0x66, 0xff, 0x07, 0xe6, 0x80, 0xeb, 0xf9];
/// The first region: 1 MiB at guest-physical 0 (code and counters).
pub const LOW_BYTES: usize = 1 << 20;
/// The second region, above a hole: 1 MiB at 4 MiB.
pub const HIGH_GPA: u64 = 4 << 20;
pub const HIGH_BYTES: usize = 1 << 20;

/// The counters' page: the last page of RAM, which a postcopy's
/// background pass reaches last.
pub const COUNTERS_GPA: u64 = HIGH_GPA + HIGH_BYTES as u64 - 4096;

/// vCPU `i`'s loop counter.
pub fn counter_gpa(i: usize) -> u64 {
    COUNTERS_GPA + 64 * i as u64
}

/// Whether `/dev/kvm` can be used: without it a test skips loudly, unless
/// `LIVEMIG_REQUIRE_KVM=1`, where skipping is a failure.
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

/// What the vCPU threads are told and tell back.
#[derive(Debug, Default)]
struct RunState {
    /// Asked to stay out of `KVM_RUN`.
    paused: bool,
    /// Asked to end.
    quit: bool,
    /// Threads parked outside `KVM_RUN` right now.
    parked: usize,
    /// How many times `resume_all` let the vCPUs go.
    resumes: u64,
    /// The first unexpected exit or error, by vCPU.
    failed: Option<String>,
}

struct Shared {
    state: Mutex<RunState>,
    changed: Condvar,
}

/// The VMM's vCPUs: each on its own thread, the fds behind locks that
/// the thread holds only while in `KVM_RUN`.
pub struct TestVcpus {
    fds: Vec<Arc<Mutex<VcpuFd>>>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl TestVcpus {
    /// Starts a thread per vCPU, parked until [`Vcpus::resume_all`].
    fn start(fds: Vec<VcpuFd>) -> Arc<TestVcpus> {
        let shared = Arc::new(Shared {
            state: Mutex::new(RunState {
                paused: true,
                ..RunState::default()
            }),
            changed: Condvar::new(),
        });
        let fds: Vec<_> = fds.into_iter().map(|f| Arc::new(Mutex::new(f))).collect();
        let threads = fds
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                let (fd, shared) = (Arc::clone(fd), Arc::clone(&shared));
                thread::Builder::new()
                    .name(format!("test-vcpu{i}"))
                    .spawn(move || vcpu_loop(i, &fd, &shared))
                    .expect("spawn a vCPU thread")
            })
            .collect();
        Arc::new(TestVcpus {
            fds,
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// Ends the vCPU threads and waits for them: afterwards no vCPU enters
    /// `KVM_RUN` again, so the VM touches its RAM no more.
    fn stop(&self) {
        self.lock().quit = true;
        self.shared.changed.notify_all();
        for t in self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = t.join();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// How many times the vCPUs were resumed.
    pub fn resumes(&self) -> u64 {
        self.lock().resumes
    }

    /// Whether the vCPUs are held out of `KVM_RUN`.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// A vCPU's failure, if one failed.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }
}

impl Drop for TestVcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

fn vcpu_loop(index: usize, fd: &Mutex<VcpuFd>, shared: &Shared) {
    loop {
        {
            let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            if st.paused && !st.quit {
                st.parked += 1;
                shared.changed.notify_all();
                while st.paused && !st.quit {
                    st = shared
                        .changed
                        .wait(st)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                st.parked -= 1;
            }
            if st.quit {
                return;
            }
        }
        let mut vcpu = fd.lock().unwrap_or_else(PoisonError::into_inner);
        let failure = match vcpu.run() {
            Ok(VcpuExit::IoOut(0x80, _)) => None,
            Ok(other) => Some(format!("vCPU {index}: unexpected exit {other:?}")),
            Err(e) => Some(format!("vCPU {index}: KVM_RUN: {e}")),
        };
        // Complete the port I/O before anyone reads the registers: one
        // more entry that exits at once.
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run();
        vcpu.set_kvm_immediate_exit(0);
        drop(vcpu);
        if let Some(f) = failure {
            let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.failed.get_or_insert(f);
            st.paused = true;
        }
    }
}

impl Vcpus for TestVcpus {
    fn count(&self) -> usize {
        self.fds.len()
    }

    fn pause_all(&self) -> Result<(), VmmError> {
        let mut st = self.lock();
        st.paused = true;
        while st.parked < self.fds.len() {
            let (next, timeout) = self
                .shared
                .changed
                .wait_timeout(st, Duration::from_secs(10))
                .unwrap_or_else(PoisonError::into_inner);
            st = next;
            if timeout.timed_out() && st.parked < self.fds.len() {
                return Err(format!("only {} vCPUs parked within 10 s", st.parked).into());
            }
        }
        Ok(())
    }

    fn resume_all(&self) -> Result<(), VmmError> {
        let mut st = self.lock();
        if let Some(f) = &st.failed {
            return Err(f.clone().into());
        }
        st.paused = false;
        st.resumes += 1;
        self.shared.changed.notify_all();
        Ok(())
    }

    fn with_vcpu(&self, index: usize, f: &mut dyn FnMut(&VcpuFd)) -> Result<(), VmmError> {
        let fd = self
            .fds
            .get(index)
            .ok_or_else(|| format!("no vCPU {index}"))?;
        f(&fd.lock().unwrap_or_else(PoisonError::into_inner));
        Ok(())
    }
}

/// A test VM: KVM's VM, its vm-memory RAM and the vCPUs.
///
/// Dropping it ends the vCPU threads before the RAM is unmapped. KVM's
/// memslots name host virtual addresses, not the mapping: a vCPU still
/// running after the unmap would read and write whatever the process maps
/// there next, such as the RAM of the next test's VM (tests run on
/// threads of one process). This happened: a finished test's guest
/// incremented a later test's counter and pushed real-mode exception
/// frames into its memory.
pub struct TestVm {
    pub kvm: Kvm,
    pub vm: Arc<VmFd>,
    pub ram: GuestMemoryMmap<AtomicBitmap>,
    pub memory: GuestMemory,
    pub vcpus: Arc<TestVcpus>,
}

impl Drop for TestVm {
    fn drop(&mut self) {
        // The library may still hold a clone of `vcpus`: stop the threads
        // here, not when the last clone goes.
        self.vcpus.stop();
    }
}

impl TestVm {
    /// A VM with `vcpus` vCPUs given the host's CPUID after `edit`.
    /// `boot`: load the guest code and point each vCPU at it (a source);
    /// otherwise the RAM stays zero and the vCPUs at reset (a destination).
    pub fn new(vcpus: usize, boot: bool, edit: impl Fn(&mut Vec<kvm_cpuid_entry2>)) -> TestVm {
        TestVm::with_extra_ram(vcpus, boot, edit, &[])
    }

    /// [`TestVm::new`] with `extra` (guest-physical address, bytes) regions
    /// after the two regions of every test VM.
    pub fn with_extra_ram(
        vcpus: usize,
        boot: bool,
        edit: impl Fn(&mut Vec<kvm_cpuid_entry2>),
        extra: &[(u64, usize)],
    ) -> TestVm {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("create_vm"));
        let mut ranges = vec![
            (GuestAddress(0), LOW_BYTES),
            (GuestAddress(HIGH_GPA), HIGH_BYTES),
        ];
        ranges.extend(extra.iter().map(|&(gpa, len)| (GuestAddress(gpa), len)));
        let ram = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges).expect("map guest RAM");
        let memory = GuestMemory::from_vm_memory(&ram, 0).expect("guest memory view");
        for region in memory.regions() {
            let slot = kvm_userspace_memory_region {
                slot: region.slot(),
                flags: 0,
                guest_phys_addr: region.guest_phys(),
                memory_size: region.len(),
                userspace_addr: region.host_addr(),
            };
            // SAFETY: the mapping belongs to `ram` (and `memory` holds a
            // clone of it), which this TestVm keeps until its vCPU threads
            // have ended (its Drop): no vCPU runs over the slot after that.
            unsafe { vm.set_user_memory_region(slot) }.expect("memslot");
        }
        if boot {
            ram.write_slice(&CODE, GuestAddress(CODE_GPA))
                .expect("load the guest code");
        }
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("supported CPUID");
        let mut entries = cpuid.as_slice().to_vec();
        edit(&mut entries);
        cpuid = kvm_bindings::CpuId::from_entries(&entries).expect("CPUID");
        let fds = (0..vcpus)
            .map(|i| {
                let fd = vm.create_vcpu(i as u64).expect("create_vcpu");
                fd.set_cpuid2(&cpuid).expect("set_cpuid2");
                if boot {
                    let mut sregs = fd.get_sregs().expect("get_sregs");
                    sregs.cs.base = 0;
                    sregs.cs.selector = 0;
                    // The counters' page through DS's cached base (never
                    // reloaded by the loop), above real mode's 1 MiB.
                    sregs.ds.base = COUNTERS_GPA;
                    sregs.ds.selector = 0;
                    fd.set_sregs(&sregs).expect("set_sregs");
                    let mut regs = fd.get_regs().expect("get_regs");
                    regs.rip = CODE_GPA;
                    regs.rflags = 2;
                    regs.rbx = counter_gpa(i) - COUNTERS_GPA;
                    fd.set_regs(&regs).expect("set_regs");
                }
                fd
            })
            .collect();
        TestVm {
            kvm,
            vm,
            ram,
            memory,
            vcpus: TestVcpus::start(fds),
        }
    }

    /// vCPU `i`'s counter, read from guest RAM.
    pub fn counter(&self, i: usize) -> u32 {
        self.ram
            .read_obj::<u32>(GuestAddress(counter_gpa(i)))
            .expect("read a counter")
    }

    /// Waits until every vCPU's counter is past `at` (within 10 s).
    pub fn counters_pass(&self, at: &[u32]) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if at.iter().enumerate().all(|(i, &c)| self.counter(i) > c) {
                return true;
            }
            thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Every vCPU's counter.
    pub fn counters(&self) -> Vec<u32> {
        (0..self.vcpus.count()).map(|i| self.counter(i)).collect()
    }
}

/// A connected pair of migration connections over a unix socket pair.
pub fn connection_pair() -> (livemig_kvm::Connection, livemig_kvm::Connection) {
    let dir = std::env::temp_dir().join(format!(
        "livemig-lib-test-{}-{:?}",
        std::process::id(),
        thread::current().id()
    ));
    let _ = std::fs::remove_file(&dir);
    let uri: livemig_kvm::transport::MigrationUri =
        format!("unix:{}", dir.display()).parse().expect("address");
    let listener = livemig_kvm::transport::Listener::bind(&uri).expect("bind");
    let ours = livemig_kvm::Connection::connect(&uri).expect("connect");
    let theirs = listener.accept().expect("accept");
    (ours, theirs)
}

/// One side of a connection a test's proxy forwards: a migration
/// [`livemig_kvm::Connection`] or a plain TCP stream.
pub trait ProxyEnd {
    /// Reads what is there, up to `buf`'s length; 0 once the stream ended
    /// or failed.
    fn read_some(&mut self, buf: &mut [u8]) -> usize;
    /// Writes all of `buf`; `false` if the stream failed.
    fn write_all_of(&mut self, buf: &[u8]) -> bool;
    /// Closes the write side, so the peer reads the end of the stream.
    fn end_writes(&mut self);

    /// Fills `buf`; `false` if the stream ended or failed first.
    fn read_all(&mut self, mut buf: &mut [u8]) -> bool {
        while !buf.is_empty() {
            let n = self.read_some(buf);
            if n == 0 {
                return false;
            }
            buf = &mut buf[n..];
        }
        true
    }
}

impl ProxyEnd for livemig_kvm::Connection {
    fn read_some(&mut self, buf: &mut [u8]) -> usize {
        self.read(buf).unwrap_or(0)
    }
    fn write_all_of(&mut self, buf: &[u8]) -> bool {
        self.write_all(buf).is_ok()
    }
    fn end_writes(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl ProxyEnd for std::net::TcpStream {
    fn read_some(&mut self, buf: &mut [u8]) -> usize {
        std::io::Read::read(self, buf).unwrap_or(0)
    }
    fn write_all_of(&mut self, buf: &[u8]) -> bool {
        std::io::Write::write_all(self, buf).is_ok()
    }
    fn end_writes(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// Copies `from` to `to` until either ends, then ends `to`'s writes.
pub fn copy_through(mut from: impl ProxyEnd, mut to: impl ProxyEnd) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = from.read_some(&mut buf);
        if n == 0 || !to.write_all_of(&buf[..n]) {
            break;
        }
    }
    to.end_writes();
}

/// Forwards a migration main stream from `from` to `to`: its 8-byte
/// header, then record by record (kind, flags, be32 length, body), each
/// handed to `each` (its kind and the whole record, header included)
/// before it goes on, so a test can damage one or act before one. Ends
/// `to`'s writes when either side ends.
pub fn forward_records(
    mut from: impl ProxyEnd,
    mut to: impl ProxyEnd,
    mut each: impl FnMut(u16, &mut Vec<u8>),
) {
    let mut header = [0u8; 8];
    if from.read_all(&mut header) && to.write_all_of(&header) {
        loop {
            let mut record = vec![0u8; 8];
            if !from.read_all(&mut record) {
                break;
            }
            let kind = u16::from_be_bytes([record[0], record[1]]);
            let len = u32::from_be_bytes([record[4], record[5], record[6], record[7]]) as usize;
            record.resize(8 + len, 0);
            if !from.read_all(&mut record[8..]) {
                break;
            }
            each(kind, &mut record);
            if !to.write_all_of(&record) {
                break;
            }
        }
    }
    to.end_writes();
}
