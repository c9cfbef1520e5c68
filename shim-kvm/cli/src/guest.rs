//! The demo guest: image bytes, load address, parameter block and port map.
//!
//! The image (`guest/demo.asm`, assembled to the committed `guest/demo.bin`)
//! is a multiboot v1 kernel that drops to ring 3 on each of its vCPUs; vCPU
//! `i` of `n` stamps pages `i, i + n, ...` of a working set generation after
//! generation, checking each page still holds the previous generation's
//! stamp. A migration that loses or tears a page shows up as a MISMATCH
//! exit. With [`GuestParams::devices`] vCPU 0 also counts 1 kHz PIT ticks
//! and writes a numbered line to the serial port every few ticks. See
//! `guest/README.md` for the full contract.

use std::fmt;

use livemig_kvm::memory::{GuestMemory, MemoryError, PAGE_SIZE};

/// The assembled image (`guest/demo.bin`), loaded flat at [`LOAD_ADDR`].
pub const IMAGE: &[u8] = include_bytes!("../guest/demo.bin");

/// Guest-physical load address of the image (1 MiB, as in its multiboot header).
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Entry point: 32-bit protected mode, ring 0, paging off, `edi` = the
/// vCPU's index; the guest then builds its own page tables and enters long
/// mode (see `guest/README.md`).
pub const ENTRY: u64 = 0x10_0020;

/// The ring-0 code a vCPU runs once booted: vCPU 0's PIT tick handler
/// (with [`FLAG_DEVICES`]), an idle vCPU's halt (`idle_handler`, entered
/// from ring 3 by `int`) and its LAPIC timer's handler, and the spurious
/// one, from `timer_handler` up to `user_entry` in `demo.asm`. A pause
/// can land in them (a halted idle vCPU is always there), so a vCPU
/// stopped at CPL 0 is in its workload only if its RIP is in here: vCPU 0
/// for a tick, or a vCPU that owns no page.
pub const RING0_HANDLERS: core::ops::Range<u64> = LOAD_ADDR + 0x332..LOAD_ADDR + 0x357;

/// Guest-physical address of the parameter block the VMM writes before boot.
pub const PARAM_ADDR: u64 = 0x5000;
/// Parameter block magic ("LMGP" little-endian).
pub const PARAM_MAGIC: u32 = 0x5047_4D4C;
/// Parameter block layout version understood by the image.
pub const PARAM_VERSION: u32 = 3;
/// Size of the parameter block.
pub const PARAM_BYTES: usize = 32;
/// Most vCPUs the image runs on.
pub const MAX_VCPUS: u32 = 8;
/// Parameter block flag: the VMM has KVM's in-kernel irqchip (PIC, LAPIC)
/// and PIT and a 16550 serial port at [`PORT_SERIAL`], so vCPU 0 counts
/// timer ticks and writes lines.
pub const FLAG_DEVICES: u32 = 1;
/// Parameter block flag: the VMM starts vCPU 0 only, as a PC's firmware
/// hands over to a kernel (QEMU's `-kernel`): vCPU 0 wakes the others with
/// INIT and SIPI, and every vCPU takes its index from its LAPIC ID rather
/// than `edi`.
pub const FLAG_START_APS: u32 = 2;

/// `out` port: sent once on reaching ring 3; 1 = parameters used, 0 = defaults.
pub const PORT_BOOTED: u16 = 0x510;
/// `out` port: pages stamped so far (wrapping u32), every `batch` pages; an
/// idle vCPU sends 0 every `idle_wakes` times it is woken from its halt.
pub const PORT_PROGRESS: u16 = 0x514;
/// `out` port: the generation just completed.
pub const PORT_GENERATION: u16 = 0x518;
/// `out` port: index of a page whose previous stamp was wrong.
pub const PORT_MISMATCH: u16 = 0x51C;
/// The first port of the 16550 serial port (COM1) the guest writes its
/// line sequence to, with [`FLAG_DEVICES`]: 8 ports from here.
pub const PORT_SERIAL: u16 = 0x3F8;

/// Guest-physical address of vCPU 0's stamp counter; vCPU `i`'s is
/// [`STAMPED_STRIDE`] `* i` above ([`stamped_addr`]). Each is a
/// little-endian u64, the pages that vCPU stamped since boot, incremented
/// after each page's last store. With `m` pages owned by the vCPU, its
/// stamp `k` (counting from 0) is its owned page `k % m` of generation
/// `k / m + 1`, so the counter says exactly where it stands at any stop,
/// whether or not a generation completed since.
pub const STAMPED_ADDR: u64 = 0x5100;
/// Distance between two vCPUs' stamp counters (a cache line each).
pub const STAMPED_STRIDE: u64 = 64;
/// Guest-physical address of the tick counter (u64): PIT interrupts vCPU 0
/// took, with [`FLAG_DEVICES`]. KVM's PIT re-injects the ticks the guest
/// could not take, so it counts milliseconds of wall-clock time since the
/// PIT started, catching up after a pause.
pub const TICKS_ADDR: u64 = 0x5300;
/// Guest-physical address of the next number the serial sequence carries
/// (u64), with [`FLAG_DEVICES`]: the lines written so far are `0 ..` it.
pub const SERIAL_SEQ_ADDR: u64 = 0x5308;

/// Stamp check word ("LMIG" little-endian) at offset 8 of a stamped page.
pub const STAMP_MAGIC: u32 = 0x4749_4D4C;

/// Lowest address a working set may start at: above the image page.
pub const MIN_WS_START: u64 = LOAD_ADDR + PAGE_SIZE as u64;

/// What the guest does; written to [`PARAM_ADDR`] by [`load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestParams {
    /// Guest-physical start of the working set (page aligned, >= [`MIN_WS_START`]).
    pub ws_start: u64,
    /// Pages in the working set; 0 makes an idle guest.
    pub ws_pages: u32,
    /// Pages stamped between two PROGRESS exits (non-zero).
    pub batch: u32,
    /// Wake-ups from its halt an idle vCPU waits between two PROGRESS
    /// exits (non-zero): its LAPIC timer wakes it every 10 ms, and vCPU 0's
    /// PIT every 1 ms with [`GuestParams::devices`]. The exits are how an
    /// idle vCPU shows it runs; halting in between keeps it off the host's
    /// CPUs, as a real idle guest is.
    pub idle_wakes: u32,
    /// vCPUs the guest runs on (1 ..= [`MAX_VCPUS`]); the VMM starts each
    /// at [`ENTRY`] with its index in `edi`.
    pub vcpus: u32,
    /// Whether the VMM has the devices of [`FLAG_DEVICES`].
    pub devices: bool,
    /// Whether vCPU 0 wakes the others ([`FLAG_START_APS`]).
    pub start_aps: bool,
}

/// Guest-physical address of vCPU `vcpu`'s stamp counter.
pub fn stamped_addr(vcpu: u32) -> u64 {
    STAMPED_ADDR + STAMPED_STRIDE * u64::from(vcpu)
}

/// How many pages of a `ws_pages` working set vCPU `vcpu` of `vcpus`
/// stamps: pages `vcpu, vcpu + vcpus, ...` below `ws_pages`.
pub fn owned_pages(ws_pages: u32, vcpus: u32, vcpu: u32) -> u32 {
    if vcpu >= ws_pages {
        0
    } else {
        (ws_pages - vcpu).div_ceil(vcpus)
    }
}

impl Default for GuestParams {
    /// The image's own defaults: 4 MiB at 2 MiB, exits every 256 pages,
    /// one vCPU, no devices.
    fn default() -> Self {
        GuestParams {
            ws_start: 0x20_0000,
            ws_pages: 1024,
            batch: 256,
            idle_wakes: 100,
            vcpus: 1,
            devices: false,
            start_aps: false,
        }
    }
}

/// Why the guest could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestError {
    /// The working set is misaligned, overlaps the image or leaves the
    /// RAM below the first hole (or 4 GiB, the end of the guest's map).
    BadWorkingSet {
        /// Requested start.
        start: u64,
        /// Requested pages.
        pages: u32,
        /// RAM from guest-physical 0 to the first hole.
        ram: u64,
    },
    /// `batch` or `idle_wakes` is zero (the guest would count down forever).
    ZeroCount,
    /// The vCPU count is 0 or above [`MAX_VCPUS`].
    BadVcpuCount(u32),
    /// Writing into guest RAM failed (RAM too small for the image).
    Memory(MemoryError),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::BadWorkingSet { start, pages, ram } => write!(
                f,
                "working set {pages} pages at {start:#x} is misaligned, below {MIN_WS_START:#x} or beyond the RAM below the hole ({ram:#x}) / 4 GiB"
            ),
            GuestError::ZeroCount => f.write_str("guest batch and idle_wakes must be non-zero"),
            GuestError::BadVcpuCount(n) => {
                write!(f, "the demo guest runs on 1 to {MAX_VCPUS} vCPUs, not {n}")
            }
            GuestError::Memory(e) => write!(f, "loading the guest: {e}"),
        }
    }
}

impl std::error::Error for GuestError {}

impl GuestParams {
    /// The parameter block as the guest reads it.
    pub fn encode(&self) -> [u8; PARAM_BYTES] {
        let fields = [
            PARAM_MAGIC,
            PARAM_VERSION,
            self.ws_start as u32,
            self.ws_pages,
            self.batch,
            self.idle_wakes,
            self.vcpus,
            if self.devices { FLAG_DEVICES } else { 0 }
                | if self.start_aps { FLAG_START_APS } else { 0 },
        ];
        let mut out = [0u8; PARAM_BYTES];
        for (chunk, v) in out.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Checks the parameters fit the image and a guest whose RAM runs
    /// unbroken from guest-physical 0 for `ram` bytes (a PC's RAM below
    /// the 32-bit hole: RAM above it is not for the working set).
    pub fn validate(&self, ram: u64) -> Result<(), GuestError> {
        if self.batch == 0 || self.idle_wakes == 0 {
            return Err(GuestError::ZeroCount);
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(GuestError::BadVcpuCount(self.vcpus));
        }
        let end = self.ws_start + u64::from(self.ws_pages) * PAGE_SIZE as u64;
        if !self.ws_start.is_multiple_of(PAGE_SIZE as u64)
            || self.ws_start < MIN_WS_START
            || end > ram
            || end > 1 << 32
        {
            return Err(GuestError::BadWorkingSet {
                start: self.ws_start,
                pages: self.ws_pages,
                ram,
            });
        }
        Ok(())
    }
}

/// Pages the guest has stamped since boot: the sum of its vCPUs' counters
/// ([`stamped_addr`]). Exact only while its vCPUs are stopped.
pub fn stamped(mem: &GuestMemory) -> Result<u64, GuestError> {
    let ws = working_set(mem)?;
    (0..ws.vcpus).try_fold(0u64, |sum, v| Ok(sum + stamped_by(mem, v)?))
}

/// Pages vCPU `vcpu` has stamped since boot.
pub fn stamped_by(mem: &GuestMemory, vcpu: u32) -> Result<u64, GuestError> {
    let mut b = [0u8; 8];
    mem.read(stamped_addr(vcpu), &mut b)
        .map_err(GuestError::Memory)?;
    Ok(u64::from_le_bytes(b))
}

/// The working set and vCPU count the guest uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkingSet {
    /// Guest-physical start.
    pub start: u64,
    /// Pages.
    pub pages: u32,
    /// vCPUs sharing it.
    pub vcpus: u32,
}

/// The working set the guest uses, read back from the parameter block in
/// its memory, with the image's defaults when the block is absent, exactly
/// as the guest itself decides.
pub fn working_set(mem: &GuestMemory) -> Result<WorkingSet, GuestError> {
    let mut b = [0u8; PARAM_BYTES];
    mem.read(PARAM_ADDR, &mut b).map_err(GuestError::Memory)?;
    let field = |i: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&b[i * 4..i * 4 + 4]);
        u32::from_le_bytes(w)
    };
    if field(0) == PARAM_MAGIC && field(1) == PARAM_VERSION {
        Ok(WorkingSet {
            start: u64::from(field(2)),
            pages: field(3),
            vcpus: field(6).clamp(1, MAX_VCPUS),
        })
    } else {
        let d = GuestParams::default();
        Ok(WorkingSet {
            start: d.ws_start,
            pages: d.ws_pages,
            vcpus: d.vcpus,
        })
    }
}

/// What [`check_stamps`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StampCheck {
    /// Pages stamped since boot, by all vCPUs ([`stamped`]).
    pub stamped: u64,
    /// Working-set pages whose stamp was checked.
    pub checked: u64,
    /// Working-set pages that do not hold the stamp the counter implies.
    pub wrong: u64,
    /// The lowest of them (page index in the working set).
    pub first_wrong: Option<u32>,
}

impl StampCheck {
    /// Every checked page holds the stamp the counter implies.
    pub fn ok(&self) -> bool {
        self.wrong == 0
    }
}

/// Checks every page of the working set against the stamp counters, with
/// the vCPUs stopped: the `l`-th page owned by vCPU `v` (index `p = v + l *
/// vcpus`) must hold the stamp of the last time `v`'s counter passed it
/// (generation `g`: `p`, `g`, "LMIG", `!(p ^ g)` at the start, `p`, `g` at
/// the end), or nothing if the vCPU never reached it. The page each vCPU
/// was stamping when it stopped (its owned page `counter % owned`) may be
/// half written and is skipped. After a migration this proves that the
/// pages stamped since the switchover carry the right stamps, and that
/// every other page kept the stamp it had.
pub fn check_stamps(mem: &GuestMemory) -> Result<StampCheck, GuestError> {
    let ws = working_set(mem)?;
    let mut check = StampCheck {
        stamped: 0,
        checked: 0,
        wrong: 0,
        first_wrong: None,
    };
    let page = PAGE_SIZE as u64;
    for v in 0..ws.vcpus {
        let stamped = stamped_by(mem, v)?;
        check.stamped += stamped;
        let owned = owned_pages(ws.pages, ws.vcpus, v);
        if owned == 0 {
            continue;
        }
        let n = u64::from(owned);
        let (full, current) = (stamped / n, (stamped % n) as u32);
        for l in (0..owned).filter(|&l| l != current) {
            let i = v + l * ws.vcpus;
            // Generations are 32-bit in the guest (its `ebp`), wrapping alike.
            let g = (full + u64::from(l < current)) as u32;
            let want = if g == 0 {
                [0; 6]
            } else {
                [i, g, STAMP_MAGIC, !(i ^ g), i, g]
            };
            let gpa = ws.start + u64::from(i) * page;
            let (mut head, mut tail) = ([0u8; 16], [0u8; 8]);
            mem.read(gpa, &mut head).map_err(GuestError::Memory)?;
            mem.read(gpa + page - 8, &mut tail)
                .map_err(GuestError::Memory)?;
            let word = |b: &[u8], k: usize| {
                let mut w = [0u8; 4];
                w.copy_from_slice(&b[k * 4..k * 4 + 4]);
                u32::from_le_bytes(w)
            };
            let got = [
                word(&head, 0),
                word(&head, 1),
                word(&head, 2),
                word(&head, 3),
                word(&tail, 0),
                word(&tail, 1),
            ];
            check.checked += 1;
            if got != want {
                check.wrong += 1;
                check.first_wrong = Some(check.first_wrong.map_or(i, |f| f.min(i)));
            }
        }
    }
    Ok(check)
}

/// The end of the RAM that runs unbroken from guest-physical 0, where the
/// working set must end.
fn low_ram_end(ram: &GuestMemory) -> u64 {
    ram.regions()
        .iter()
        .try_fold(0, |end, r| {
            if r.guest_phys() == end {
                Ok(r.guest_end())
            } else {
                Err(end)
            }
        })
        .unwrap_or_else(|end| end)
}

/// Copies the image to [`LOAD_ADDR`] and the parameter block to
/// [`PARAM_ADDR`]; the vCPU must then start at [`ENTRY`].
pub fn load(ram: &GuestMemory, params: &GuestParams) -> Result<(), GuestError> {
    params.validate(low_ram_end(ram))?;
    ram.write(LOAD_ADDR, IMAGE).map_err(GuestError::Memory)?;
    ram.write(PARAM_ADDR, &params.encode())
        .map_err(GuestError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_kvm::memory::RegionLayout;

    fn fresh_ram(size: u64) -> GuestMemory {
        GuestMemory::anonymous(&RegionLayout::contiguous("pc.ram", size, size).unwrap()).unwrap()
    }

    fn word(i: usize) -> u32 {
        u32::from_le_bytes(IMAGE[i * 4..i * 4 + 4].try_into().unwrap())
    }

    #[test]
    fn multiboot_header_matches_constants() {
        assert_eq!(word(0), 0x1BAD_B002);
        assert_eq!(word(0).wrapping_add(word(1)).wrapping_add(word(2)), 0);
        assert_eq!(word(1) & (1 << 16), 1 << 16, "a.out kludge flag");
        assert_eq!(u64::from(word(3)), LOAD_ADDR, "header_addr");
        assert_eq!(u64::from(word(4)), LOAD_ADDR, "load_addr");
        assert_eq!(
            word(5) as usize,
            LOAD_ADDR as usize + IMAGE.len(),
            "load_end"
        );
        assert_eq!(u64::from(word(7)), ENTRY, "entry");
        assert!(IMAGE.len() <= PAGE_SIZE, "image fits its page");
    }

    #[test]
    fn committed_image_matches_source() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/guest");
        let out = std::env::temp_dir().join(format!("livemig-demo-{}.bin", std::process::id()));
        let status = std::process::Command::new("nasm")
            .args(["-f", "bin", "-o"])
            .arg(&out)
            .arg(format!("{dir}/demo.asm"))
            .status();
        match status {
            Ok(s) if s.success() => {
                let built = std::fs::read(&out).unwrap();
                let _ = std::fs::remove_file(&out);
                assert_eq!(built, IMAGE, "guest/demo.bin is stale: run guest/build.sh");
            }
            _ => eprintln!("SKIPPED: nasm not available, demo.bin not re-checked"),
        }
    }

    #[test]
    fn ring0_handlers_are_where_the_image_has_them() {
        let at = |gpa: u64| (gpa - LOAD_ADDR) as usize;
        // `inc qword [TICKS_ADDR]` opens the timer handler; `iretq` ends
        // the spurious one, just before `user_entry`.
        let start = at(RING0_HANDLERS.start);
        assert_eq!(IMAGE[start..start + 4], [0x48, 0xFF, 0x04, 0x25]);
        let tick = u32::try_from(TICKS_ADDR).unwrap().to_le_bytes();
        assert_eq!(IMAGE[start + 4..start + 8], tick);
        let end = at(RING0_HANDLERS.end);
        assert_eq!(IMAGE[end - 2..end], [0x48, 0xCF], "iretq");
        // With nasm, the listing's labels say the same.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/guest");
        let tmp = std::env::temp_dir();
        let lst = tmp.join(format!("livemig-demo-{}.lst", std::process::id()));
        let bin = tmp.join(format!("livemig-demo-{}.lst.bin", std::process::id()));
        let status = std::process::Command::new("nasm")
            .args(["-f", "bin", "-l"])
            .arg(&lst)
            .arg("-o")
            .arg(&bin)
            .arg(format!("{dir}/demo.asm"))
            .status();
        let Ok(s) = status else {
            eprintln!("SKIPPED: nasm not available, the handlers' labels not re-checked");
            return;
        };
        assert!(s.success());
        let listing = std::fs::read_to_string(&lst).unwrap();
        let _ = std::fs::remove_file(&lst);
        let _ = std::fs::remove_file(&bin);
        // The offset of the first instruction after a label's line.
        let offset_after = |label: &str| {
            let mut lines = listing
                .lines()
                .skip_while(|l| !l.trim_end().ends_with(label));
            lines.next().expect(label);
            lines
                .find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() > 2 && f[1].len() == 8)
                        .then(|| u64::from_str_radix(f[1], 16).ok())
                        .flatten()
                })
                .expect(label)
        };
        assert_eq!(
            offset_after("timer_handler:"),
            RING0_HANDLERS.start - LOAD_ADDR
        );
        assert_eq!(offset_after("user_entry:"), RING0_HANDLERS.end - LOAD_ADDR);
    }

    /// Writes the stamp of page `i`, generation `g` as the guest does.
    fn stamp(ram: &GuestMemory, start: u64, i: u32, g: u32) {
        let gpa = start + u64::from(i) * PAGE_SIZE as u64;
        let head: Vec<u8> = [i, g, STAMP_MAGIC, !(i ^ g)]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        ram.write(gpa, &head).unwrap();
        let tail: Vec<u8> = [i, g].iter().flat_map(|w| w.to_le_bytes()).collect();
        ram.write(gpa + PAGE_SIZE as u64 - 8, &tail).unwrap();
    }

    #[test]
    fn stamps_are_checked_against_the_counter() {
        let ram = fresh_ram(4 << 20);
        let p = GuestParams {
            ws_start: 2 << 20,
            ws_pages: 8,
            ..GuestParams::default()
        };
        load(&ram, &p).unwrap();
        assert_eq!(
            working_set(&ram).unwrap(),
            WorkingSet {
                start: 2 << 20,
                pages: 8,
                vcpus: 1
            }
        );
        // Two whole generations and three pages of the third: counter 19,
        // page 3 being stamped (half written: skipped).
        for k in 0..19u32 {
            stamp(&ram, p.ws_start, k % 8, k / 8 + 1);
        }
        ram.write(STAMPED_ADDR, &19u64.to_le_bytes()).unwrap();
        ram.write(p.ws_start + 3 * PAGE_SIZE as u64, &[0xff; 8])
            .unwrap();
        let c = check_stamps(&ram).unwrap();
        assert_eq!((c.stamped, c.checked, c.wrong), (19, 7, 0), "{c:?}");
        assert!(c.ok());
        // A page that lost its newest stamp (generation 3 expected) is found.
        stamp(&ram, p.ws_start, 1, 2);
        let c = check_stamps(&ram).unwrap();
        assert_eq!((c.wrong, c.first_wrong), (1, Some(1)), "{c:?}");
        assert!(!c.ok());
        // A counter ahead of the stamps (stamps that never arrived) too.
        stamp(&ram, p.ws_start, 1, 3);
        ram.write(STAMPED_ADDR, &21u64.to_le_bytes()).unwrap();
        let c = check_stamps(&ram).unwrap();
        assert_eq!((c.wrong, c.first_wrong), (2, Some(3)), "{c:?}");
        // Before the first generation completes, unreached pages are empty.
        let fresh = fresh_ram(4 << 20);
        load(&fresh, &p).unwrap();
        stamp(&fresh, p.ws_start, 0, 1);
        fresh.write(STAMPED_ADDR, &1u64.to_le_bytes()).unwrap();
        assert!(check_stamps(&fresh).unwrap().ok());
        // An idle guest has nothing to check.
        let idle = fresh_ram(4 << 20);
        load(&idle, &GuestParams { ws_pages: 0, ..p }).unwrap();
        assert_eq!(check_stamps(&idle).unwrap().checked, 0);
    }

    #[test]
    fn each_vcpu_is_checked_against_its_own_counter() {
        let ram = fresh_ram(4 << 20);
        let p = GuestParams {
            ws_start: 2 << 20,
            ws_pages: 8,
            vcpus: 3,
            ..GuestParams::default()
        };
        load(&ram, &p).unwrap();
        // vCPU 0 owns pages 0, 3, 6; vCPU 1 owns 1, 4, 7; vCPU 2 owns 2, 5.
        assert_eq!(
            (0..3).map(|v| owned_pages(8, 3, v)).collect::<Vec<_>>(),
            [3, 3, 2]
        );
        assert_eq!(owned_pages(2, 3, 2), 0);
        // vCPU 0: one generation and one page (page 0 at generation 2, page
        // 3 being stamped); vCPU 1: two pages of generation 1; vCPU 2:
        // nothing yet.
        for (page, g) in [(0, 2), (3, 1), (6, 1), (1, 1), (4, 1)] {
            stamp(&ram, p.ws_start, page, g);
        }
        ram.write(stamped_addr(0), &4u64.to_le_bytes()).unwrap();
        ram.write(stamped_addr(1), &2u64.to_le_bytes()).unwrap();
        let c = check_stamps(&ram).unwrap();
        // Skipped: vCPU 0's page 3, vCPU 1's page 7, vCPU 2's page 2.
        assert_eq!((c.stamped, c.checked, c.wrong), (6, 5, 0), "{c:?}");
        assert_eq!(stamped(&ram).unwrap(), 6);
        // A stamp vCPU 2 never wrote is found on its page.
        stamp(&ram, p.ws_start, 5, 1);
        let c = check_stamps(&ram).unwrap();
        assert_eq!((c.wrong, c.first_wrong), (1, Some(5)), "{c:?}");
    }

    #[test]
    fn the_working_set_must_end_in_the_ram_below_the_first_hole() {
        // 8 MiB at 0 (two adjacent regions) and 4 MiB past a hole at 16 MiB.
        let region = |name: &str, guest_phys, len, slot| RegionLayout {
            name: name.into(),
            guest_phys,
            len,
            slot,
        };
        let ram = GuestMemory::anonymous(&[
            region("lo", 0, 4 << 20, 0),
            region("lo.1", 4 << 20, 4 << 20, 1),
            region("hi", 16 << 20, 4 << 20, 2),
        ])
        .unwrap();
        let fits = GuestParams {
            ws_start: 2 << 20,
            ws_pages: 1536,
            ..GuestParams::default()
        };
        load(&ram, &fits).unwrap();
        let into_the_hole = GuestParams {
            ws_pages: 1537,
            ..fits
        };
        assert_eq!(
            load(&ram, &into_the_hole),
            Err(GuestError::BadWorkingSet {
                start: 2 << 20,
                pages: 1537,
                ram: 8 << 20
            })
        );
        let above_the_hole = GuestParams {
            ws_start: 16 << 20,
            ws_pages: 1,
            ..fits
        };
        assert!(load(&ram, &above_the_hole).is_err());
    }

    #[test]
    fn params_validated_and_encoded() {
        let p = GuestParams::default();
        let b = p.encode();
        assert_eq!(&b[0..4], &PARAM_MAGIC.to_le_bytes());
        assert_eq!(&b[12..16], &1024u32.to_le_bytes());
        assert!(p.validate(64 << 20).is_ok());
        assert!(p.validate(4 << 20).is_err());
        let low = GuestParams {
            ws_start: LOAD_ADDR,
            ..p
        };
        assert!(low.validate(64 << 20).is_err());
        let zero = GuestParams { batch: 0, ..p };
        assert_eq!(zero.validate(64 << 20), Err(GuestError::ZeroCount));
        for vcpus in [0, MAX_VCPUS + 1] {
            let bad = GuestParams { vcpus, ..p };
            assert_eq!(bad.validate(64 << 20), Err(GuestError::BadVcpuCount(vcpus)));
        }
        let b = GuestParams {
            vcpus: 4,
            devices: true,
            ..p
        }
        .encode();
        assert_eq!(&b[24..32], &[4, 0, 0, 0, 1, 0, 0, 0]);
        let b = GuestParams {
            devices: true,
            start_aps: true,
            ..p
        }
        .encode();
        assert_eq!(&b[28..32], &[3, 0, 0, 0]);
        let top = GuestParams {
            ws_start: (4 << 30) - 4096,
            ws_pages: 2,
            ..p
        };
        assert!(top.validate(8 << 30).is_err());
    }
}
