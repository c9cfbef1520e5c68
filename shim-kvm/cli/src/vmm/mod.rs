//! The demo VMM: a small KVM VMM built the way an outside VMM is, on
//! rust-vmm crates only (kvm-ioctls, vm-memory, vm-superio), so that
//! livemig-kvm can be shown migrating a VMM it does not own.
//!
//! It owns its `Kvm` and `VmFd`; guest RAM is a vm-memory
//! `GuestMemoryMmap<AtomicBitmap>`, laid out around the 32-bit hole as a
//! PC's is ([`ram`]), whose regions it registers as KVM memslots itself
//! (one per region); the interrupt controllers (PIC x2,
//! IOAPIC, a LAPIC per vCPU) and the PIT are KVM's in-kernel ones; COM1 is
//! vm-superio's 16550 ([`serial`]); each vCPU runs on its own thread
//! ([`vcpus`]), which implements [`livemig_kvm::vmm::Vcpus`]. It boots the
//! demo guest ([`crate::guest`]) on all of its vCPUs at once, each
//! started at the entry point with its index, no INIT/SIPI.

pub mod ram;
pub mod serial;
pub mod vcpus;

use std::fmt;
use std::sync::Arc;

use crate::guest::{self, GuestError, GuestParams};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, kvm_mp_state, kvm_pit_config, kvm_segment,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use livemig_kvm::memory::{GuestMemory, MemoryError};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::FromRangesError;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion,
};

pub use self::ram::MAX_MEM_BYTES;
use self::ram::{MIN_MEM_BYTES, RamLayout};
use self::serial::SerialPort;
use self::vcpus::{DemoVcpus, VcpuError};

/// Guest RAM as the demo VMM holds it: vm-memory's mmap backend with a
/// dirty bitmap of the VMM's own writes.
pub type DemoMemory = GuestMemoryMmap<AtomicBitmap>;

/// vCPUs when `--vcpus` is not given.
pub const DEFAULT_VCPUS: u32 = 2;

/// Where KVM may put the three pages of its real-mode TSS (Intel needs
/// one): near the top of the 32-bit hole, clear of RAM, the IOAPIC and the
/// LAPIC (the address Firecracker and Cloud Hypervisor use).
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Why the VMM could not be built or the guest booted.
#[derive(Debug)]
pub enum BootError {
    /// A KVM ioctl failed (operation and errno).
    Kvm(&'static str, i32),
    /// The vCPU count is outside 1 ..= [`guest::MAX_VCPUS`].
    VcpuCount(u32),
    /// The RAM size is not a whole number of pages within the demo
    /// guest's needs and [`MAX_MEM_BYTES`].
    MemorySize(u64),
    /// Mapping guest RAM failed.
    Map(FromRangesError),
    /// Writing the image or its parameters into guest RAM failed.
    Memory(GuestMemoryError),
    /// The guest's parameters do not fit this VM.
    Guest(GuestError),
    /// The parameters name a vCPU count other than the VMM's.
    ParamsVcpus {
        /// The VMM's vCPUs.
        vmm: u32,
        /// The parameters' vCPUs.
        params: u32,
    },
    /// COM1's interrupt eventfd could not be made or registered.
    Serial(std::io::Error),
    /// livemig refused the RAM as guest memory.
    Lend(MemoryError),
    /// Starting or reaching a vCPU failed.
    Vcpu(VcpuError),
    /// Preallocating guest RAM (`--mem-prealloc`) failed.
    Prealloc(MemoryError),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Kvm(op, e) => write!(f, "KVM {op} failed: errno {e}"),
            BootError::VcpuCount(n) => write!(
                f,
                "--vcpus {n}: the demo VMM runs 1 to {} vCPUs",
                guest::MAX_VCPUS
            ),
            BootError::MemorySize(b) => write!(
                f,
                "guest RAM of {b} bytes: must be whole pages, at least {} MiB and at most {} MiB",
                MIN_MEM_BYTES >> 20,
                MAX_MEM_BYTES >> 20
            ),
            BootError::Map(e) => write!(f, "mapping guest RAM: {e}"),
            BootError::Memory(e) => write!(f, "writing guest RAM: {e}"),
            BootError::Guest(e) => write!(f, "{e}"),
            BootError::ParamsVcpus { vmm, params } => {
                write!(f, "guest parameters name {params} vCPUs, the VMM has {vmm}")
            }
            BootError::Serial(e) => write!(f, "setting up COM1's interrupt: {e}"),
            BootError::Lend(e) => write!(f, "guest RAM as livemig's guest memory: {e}"),
            BootError::Vcpu(e) => write!(f, "{e}"),
            BootError::Prealloc(e) => write!(f, "--mem-prealloc: {e}"),
        }
    }
}

impl std::error::Error for BootError {}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> BootError {
    move |e| BootError::Kvm(op, e.errno())
}

/// The demo VMM. Guest RAM outlives every vCPU thread: [`DemoVcpus`]
/// holds it too, so a `Vcpus` lent to livemig keeps it mapped.
pub struct DemoVmm {
    vcpus: Arc<DemoVcpus>,
    serial: SerialPort,
    vm: Arc<VmFd>,
    memory: Arc<DemoMemory>,
    lent: GuestMemory,
    ram: RamLayout,
}

impl fmt::Debug for DemoVmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoVmm")
            .field("vcpus", &self.vcpus)
            .field("ram", &self.ram)
            .finish_non_exhaustive()
    }
}

impl DemoVmm {
    /// A VM with `mem_bytes` of RAM (at guest-physical 0, and the part
    /// beyond [`ram::LOW_RAM_MAX`] at 4 GiB), the in-kernel irqchip and
    /// PIT, COM1, and `vcpus` parked vCPUs.
    pub fn new(mem_bytes: u64, vcpus: u32) -> Result<DemoVmm, BootError> {
        if !(1..=guest::MAX_VCPUS).contains(&vcpus) {
            return Err(BootError::VcpuCount(vcpus));
        }
        let ram = RamLayout::new(mem_bytes)?;
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("create_vm"))?;
        vm.set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm_err("set_tss_address"))?;
        vm.create_irq_chip().map_err(kvm_err("create_irq_chip"))?;
        vm.create_pit2(kvm_pit_config::default())
            .map_err(kvm_err("create_pit2"))?;
        let memory = DemoMemory::from_ranges(&ram.ranges()).map_err(BootError::Map)?;
        register_memslots(&vm, &memory)?;
        let lent = GuestMemory::from_vm_memory(&memory, 0).map_err(BootError::Lend)?;
        let serial = SerialPort::new(&vm).map_err(BootError::Serial)?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get_supported_cpuid"))?;
        let mut fds = Vec::new();
        for index in 0..vcpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("create_vcpu"))?;
            for e in cpuid.as_mut_slice() {
                match e.function {
                    // Initial APIC ID, bits 31..24 of leaf 1's EBX; x2APIC ID.
                    0x1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
                    0xb | 0x1f => e.edx = index,
                    _ => {}
                }
            }
            fd.set_cpuid2(&cpuid).map_err(kvm_err("set_cpuid2"))?;
            fds.push(fd);
        }
        let memory = Arc::new(memory);
        let vcpus = DemoVcpus::start(fds, Arc::clone(&memory), &serial).map_err(BootError::Vcpu)?;
        Ok(DemoVmm {
            vcpus: Arc::new(vcpus),
            serial,
            vm: Arc::new(vm),
            memory,
            lent,
            ram,
        })
    }

    /// Loads the demo guest with `params` and puts every (parked) vCPU at
    /// its entry, vCPU `i` with `edi = i`; [`DemoVcpus::resume`] starts it.
    pub fn boot(&self, params: &GuestParams) -> Result<(), BootError> {
        let vmm = self.vcpu_count();
        if params.vcpus != vmm {
            return Err(BootError::ParamsVcpus {
                vmm,
                params: params.vcpus,
            });
        }
        // The guest's working set stays below the hole, in region 0.
        params
            .validate(self.ram.low_bytes())
            .map_err(BootError::Guest)?;
        self.memory
            .write_slice(guest::IMAGE, GuestAddress(guest::LOAD_ADDR))
            .map_err(BootError::Memory)?;
        self.memory
            .write_slice(&params.encode(), GuestAddress(guest::PARAM_ADDR))
            .map_err(BootError::Memory)?;
        for index in 0..vmm as usize {
            self.vcpus
                .with_parked(index, |fd| boot_registers(fd, index as u64))
                .map_err(BootError::Vcpu)??;
        }
        Ok(())
    }

    /// The vCPUs, for pause/resume and livemig.
    pub fn vcpus(&self) -> &Arc<DemoVcpus> {
        &self.vcpus
    }

    /// How many vCPUs the VMM has.
    pub fn vcpu_count(&self) -> u32 {
        // At most guest::MAX_VCPUS, checked in `new`.
        livemig_kvm::vmm::Vcpus::count(&*self.vcpus) as u32
    }

    /// How guest RAM splits around the 32-bit hole.
    pub fn ram(&self) -> RamLayout {
        self.ram
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<DemoMemory> {
        &self.memory
    }

    /// Guest RAM as livemig sees it: region `i` of [`DemoVmm::memory`] is
    /// memslot `i` and RAM block `ram{i}`. The stamp checks read it
    /// ([`guest::check_stamps`]).
    pub fn guest_memory(&self) -> &GuestMemory {
        &self.lent
    }

    /// Populates all of guest RAM now, from a thread per CPU (QEMU's
    /// `-mem-prealloc`), and returns the milliseconds it took: a receiving
    /// VMM's start-up, so that the migration's pages land in memory
    /// already allocated ([`GuestMemory::prealloc`]).
    pub fn prealloc(&self) -> Result<f64, BootError> {
        let at = livemig_kvm::clock::monotonic_ns();
        let threads = std::thread::available_parallelism().unwrap_or(std::num::NonZeroUsize::MIN);
        self.lent.prealloc(threads).map_err(BootError::Prealloc)?;
        Ok((livemig_kvm::clock::monotonic_ns() - at) as f64 / 1e6)
    }

    /// COM1.
    pub fn serial(&self) -> &SerialPort {
        &self.serial
    }

    /// The little-endian u64 at guest-physical `gpa`, copied out (the
    /// guest may be writing it).
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.lent.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Timer ticks vCPU 0 has counted ([`guest::TICKS_ADDR`]).
    pub fn ticks(&self) -> Result<u64, MemoryError> {
        self.read_u64(guest::TICKS_ADDR)
    }
}

/// Registers every region of `memory` as a KVM memslot (slot = region
/// index).
fn register_memslots(vm: &VmFd, memory: &DemoMemory) -> Result<(), BootError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(BootError::Memory)?;
        let slot = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host .. host + len` is the region's own mapping, owned
        // by an `Arc` that the `DemoVmm` and its `DemoVcpus` hold, so it
        // stays mapped for as long as a vCPU thread can run the guest (the
        // only way KVM touches guest RAM here).
        unsafe { vm.set_user_memory_region(slot) }.map_err(kvm_err("set_user_memory_region"))?;
    }
    Ok(())
}

/// vCPU `index` at the demo guest's entry: flat 32-bit protected mode,
/// ring 0, paging off (CS/DS/ES/FS/GS/SS base 0, limit 4 GiB), rflags = 2,
/// `edi` = its index, runnable (no INIT/SIPI).
fn boot_registers(fd: &VcpuFd, index: u64) -> Result<(), BootError> {
    let mut sregs = fd.get_sregs().map_err(kvm_err("get_sregs"))?;
    let flat = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
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
    sregs.cs = flat(0x08, 0xb);
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
    regs.rip = guest::ENTRY;
    regs.rflags = 2;
    regs.rdi = index;
    fd.set_regs(&regs).map_err(kvm_err("set_regs"))?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(kvm_err("set_mp_state"))
}
