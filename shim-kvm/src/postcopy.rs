//! Postcopy on the destination: guest RAM whose missing pages are fetched on
//! demand through userfaultfd.
//!
//! In postcopy the destination guest runs before all of its memory has
//! arrived. [`PostcopyRam`] registers every region of a [`GuestMemory`] with a
//! userfaultfd in *missing* mode, so a touch of a page that was never placed
//! (or was [discarded](PostcopyRam::discard)) blocks the touching thread —
//! the vCPU thread inside `KVM_RUN`, or any host thread — until the page is
//! installed atomically with `UFFDIO_COPY` ([`PostcopyRam::place`]) or
//! `UFFDIO_ZEROPAGE` ([`PostcopyRam::place_zero`]). A [`FaultThread`] reads
//! the fault events and forwards each one, as a page-aligned guest-physical
//! address and the faulting thread id, to the engine, which turns it into a
//! page request on the return path.
//!
//! Three kernel facts shape this module:
//!
//! - KVM resolves guest memory with kernel-mode faults (`get_user_pages` on
//!   the vCPU thread). A userfaultfd created with `UFFD_USER_MODE_ONLY` (the
//!   default of the `userfaultfd` crate's builder, and the only kind an
//!   unprivileged process may create) does not receive those faults: KVM
//!   then finds no page, and the vCPU exits with an MMIO read *inside* RAM.
//!   This module always asks for a full userfaultfd (which needs root or
//!   `CAP_SYS_PTRACE`), and [`PostcopyRam::explain_mmio_exit`] names this
//!   cause when that misleading exit happens anyway.
//! - `UFFDIO_COPY` onto a page that is already present fails with `EEXIST`,
//!   and a copy that stops part-way reports `EAGAIN` with the bytes done.
//!   Both happen in normal operation (the background push and a fault
//!   answer race for the same page), so the ioctls are issued here with
//!   `libc` to see the exact errno and count: an already-present page is
//!   counted and skipped, never an error.
//! - Transparent huge pages are turned off (`MADV_NOHUGEPAGE`) on the
//!   registered RAM for the duration. Measured here, missing faults are
//!   delivered per 4 KiB page and placement works with the huge-page hint
//!   left on too (the kernel hands a missing fault to userfaultfd instead
//!   of allocating a huge page), at the same latency; the hint is dropped
//!   anyway, as QEMU does, because pages arrive and are discarded 4 KiB at
//!   a time and a huge page collapsed in between would tie 512 of them
//!   together (a 4 KiB discard then splits it). [`PostcopyRam::unregister`]
//!   restores the hint.
//!
//! A vCPU waiting for a page cannot be parked before the page arrives on
//! this (PVM) host: the pause kick does not take it out of `KVM_RUN`, it
//! refaults in a loop (measured 50 000-350 000 userfaultfd events per second, one
//! per refault) until the page is placed. The fault thread counts those as
//! duplicates instead of requesting the page again, and a destination that
//! pauses during postcopy must keep serving requests until the pause
//! completes.
//!
//! Timing is recorded as well: per-fault latency (fault event read → page
//! placed) and per-thread blocktime (the sum of the waits of every thread
//! that faulted), as in QEMU's postcopy blocktime statistics.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use livemig_core::bitmap::{DirtyBitmap, words_for};
use livemig_core::destination::{FaultBooks, FaultBooksError};
use livemig_core::time::Instant;
use userfaultfd::{Event, EventBuffer, FeatureFlags, IoctlFlags, ReadWrite, Uffd, UffdBuilder};

use crate::clock;
use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// How many consecutive `EAGAIN`s without progress a fill tolerates before
/// giving up: `EAGAIN` with nothing done means the address space was being
/// changed under the ioctl, which is transient.
const MAX_NO_PROGRESS: u32 = 1000;

/// Fault events read per `read(2)` of the userfaultfd.
const EVENT_BATCH: usize = 64;

/// Why a postcopy operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostcopyError {
    /// The userfaultfd could not be created or configured (the text says why;
    /// a full userfaultfd needs root or `CAP_SYS_PTRACE`).
    Create(String),
    /// Registering the slot at guest-physical `gpa` (`len` bytes) failed.
    Register {
        /// Start of the slot.
        gpa: u64,
        /// Length of the slot.
        len: u64,
        /// The errno.
        errno: i32,
    },
    /// The registered range does not offer `UFFDIO_COPY`, `UFFDIO_ZEROPAGE`
    /// and `UFFDIO_WAKE` (bit mask of what it offers).
    MissingIoctls(u64),
    /// Unregistering the slot at `gpa` failed.
    Unregister {
        /// Start of the slot.
        gpa: u64,
        /// The errno.
        errno: i32,
    },
    /// The range is empty or not page aligned (start and length).
    Misaligned {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
    /// The range is not inside guest RAM.
    Memory(MemoryError),
    /// `madvise(MADV_DONTNEED)` of a discarded range failed.
    Discard {
        /// Start of the range.
        gpa: u64,
        /// The errno.
        errno: i32,
    },
    /// `UFFDIO_COPY` failed at `gpa` with this errno (not `EEXIST`).
    Copy {
        /// Page where the copy stopped.
        gpa: u64,
        /// The errno.
        errno: i32,
    },
    /// `UFFDIO_ZEROPAGE` failed at `gpa` with this errno (not `EEXIST`).
    Zeropage {
        /// Page where the fill stopped.
        gpa: u64,
        /// The errno.
        errno: i32,
    },
    /// A fill kept returning `EAGAIN` without progress at `gpa`.
    NoProgress {
        /// Page where the fill stalled.
        gpa: u64,
    },
    /// The RAM was unregistered; pages can no longer be placed or discarded.
    NotRegistered,
    /// Reading fault events failed (the text says why).
    ReadEvents(String),
    /// A fault was reported at a host address outside every slot.
    FaultOutsideRam {
        /// Host virtual address of the fault.
        host_addr: u64,
    },
    /// `poll(2)`, `eventfd(2)` or a write to the shutdown eventfd failed.
    Sys(&'static str, i32),
    /// The fault thread could not be spawned.
    Spawn(String),
    /// The fault thread panicked (in the forwarding callback).
    FaultThreadPanicked,
    /// The fault books overflowed (see [`FaultBooksError`]).
    Books(FaultBooksError),
    /// The vCPU exited with an MMIO access at `addr` inside postcopy RAM:
    /// KVM did not see the page and the fault never reached userfaultfd.
    FaultNotDelivered {
        /// Guest-physical address of the access.
        addr: u64,
    },
}

impl fmt::Display for PostcopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostcopyError::Create(e) => write!(f, "creating the userfaultfd: {e}"),
            PostcopyError::Register { gpa, len, errno } => write!(
                f,
                "registering guest RAM {gpa:#x}+{len:#x} with userfaultfd: errno {errno}"
            ),
            PostcopyError::MissingIoctls(bits) => write!(
                f,
                "userfaultfd range lacks COPY/ZEROPAGE/WAKE (offers ioctl mask {bits:#x})"
            ),
            PostcopyError::Unregister { gpa, errno } => write!(
                f,
                "unregistering guest RAM at {gpa:#x} from userfaultfd: errno {errno}"
            ),
            PostcopyError::Misaligned { gpa, len } => write!(
                f,
                "postcopy range {gpa:#x}+{len:#x} is empty or not aligned to {PAGE_SIZE}"
            ),
            PostcopyError::Memory(e) => write!(f, "postcopy range: {e}"),
            PostcopyError::Discard { gpa, errno } => {
                write!(f, "discarding guest RAM at {gpa:#x}: errno {errno}")
            }
            PostcopyError::Copy { gpa, errno } => {
                write!(f, "UFFDIO_COPY into guest page {gpa:#x}: errno {errno}")
            }
            PostcopyError::Zeropage { gpa, errno } => {
                write!(f, "UFFDIO_ZEROPAGE at guest page {gpa:#x}: errno {errno}")
            }
            PostcopyError::NoProgress { gpa } => write!(
                f,
                "placing guest page {gpa:#x}: {MAX_NO_PROGRESS} EAGAINs without progress"
            ),
            PostcopyError::NotRegistered => {
                f.write_str("guest RAM is no longer registered with userfaultfd")
            }
            PostcopyError::ReadEvents(e) => write!(f, "reading userfaultfd events: {e}"),
            PostcopyError::FaultOutsideRam { host_addr } => write!(
                f,
                "userfaultfd reported a fault at host address {host_addr:#x}, outside guest RAM"
            ),
            PostcopyError::Sys(op, errno) => {
                write!(f, "postcopy fault thread: {op}: errno {errno}")
            }
            PostcopyError::Spawn(e) => write!(f, "spawning the postcopy fault thread: {e}"),
            PostcopyError::Books(e) => write!(f, "postcopy fault books: {e}"),
            PostcopyError::FaultThreadPanicked => {
                f.write_str("the postcopy fault thread panicked in its callback")
            }
            PostcopyError::FaultNotDelivered { addr } => write!(
                f,
                "vCPU saw an MMIO access at {addr:#x} inside guest RAM registered with \
                 userfaultfd: KVM's kernel-mode fault was not delivered (a user-mode-only \
                 userfaultfd, UFFD_USER_MODE_ONLY, cannot serve KVM)"
            ),
        }
    }
}

impl std::error::Error for PostcopyError {}

impl From<MemoryError> for PostcopyError {
    fn from(e: MemoryError) -> Self {
        PostcopyError::Memory(e)
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The errno inside a `userfaultfd` crate error, 0 when it carries none.
fn uffd_errno(e: &userfaultfd::Error) -> i32 {
    match e {
        userfaultfd::Error::CopyFailed(n)
        | userfaultfd::Error::ZeropageFailed(n)
        | userfaultfd::Error::SystemError(n) => *n as i32,
        userfaultfd::Error::OpenDevUserfaultfd(io) => io.raw_os_error().unwrap_or(0),
        _ => 0,
    }
}

// The kernel's ioctl arguments (`linux/userfaultfd.h`), issued directly so
// the exact errno and the partial count are visible.

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `_IOWR(0xAA, nr, size)`: read-write ioctl of the userfaultfd type.
const fn uffd_iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}

const UFFDIO_COPY: u64 = uffd_iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = uffd_iowr(0x04, std::mem::size_of::<UffdioZeropage>());

/// How a range is filled.
#[derive(Clone, Copy)]
enum Fill {
    /// `UFFDIO_COPY` from this host buffer (same length as the range).
    Copy(*const u8),
    /// `UFFDIO_ZEROPAGE`.
    Zero,
}

/// A page fault forwarded to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Page-aligned guest-physical address of the missing page.
    pub gpa: u64,
    /// Kernel thread id of the faulting thread (the vCPU thread for guest
    /// accesses), for per-vCPU blocktime.
    pub tid: i32,
    /// Whether the access was a write.
    pub write: bool,
}

/// What one [`PostcopyRam::place`] or [`PostcopyRam::place_zero`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placed {
    /// Pages installed by this call.
    pub installed: u64,
    /// Pages that were already present and left untouched (`EEXIST`).
    pub already_present: u64,
}

/// Counters and timings of a [`PostcopyRam`] (see [`PostcopyRam::stats`]).
///
/// The waits, latencies and blocktime come from the core's
/// [`FaultBooks`], whose latency storage is one word per guest page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PostcopyStats {
    /// Page-fault events read from the userfaultfd.
    pub faults_read: u64,
    /// Faults forwarded to the engine (first fault on a page).
    pub faults_forwarded: u64,
    /// Faults on a page already requested (not forwarded again).
    pub faults_duplicate: u64,
    /// Faults read after their page had been placed (not forwarded).
    pub faults_stale: u64,
    /// Pages installed with `UFFDIO_COPY`.
    pub pages_copied: u64,
    /// Pages installed with `UFFDIO_ZEROPAGE`.
    pub pages_zeroed: u64,
    /// Placements skipped because the page was already present (`EEXIST`).
    pub already_present: u64,
    /// Pages dropped by [`PostcopyRam::discard`].
    pub pages_discarded: u64,
    /// Requests outstanding now.
    pub outstanding: usize,
    /// Resolved requests that contributed a latency sample.
    pub latency_samples: usize,
    /// Median fault latency (event read → page placed), microseconds.
    pub latency_median_us: Option<f64>,
    /// 99th percentile fault latency, microseconds.
    pub latency_p99_us: Option<f64>,
    /// Every latency sample, nanoseconds, in no particular order: for a
    /// caller pooling the requests of several migrations.
    pub latencies_ns: Vec<u64>,
    /// Total time each faulting thread spent waiting, by thread id, sorted.
    pub blocktime: Vec<(i32, Duration)>,
}

/// Mutable state shared by the placing threads and the fault thread.
///
/// The fault thread answers a refault without the engine (which the
/// migration thread owns): on a paravirtual host a vCPU waiting for a page
/// refaults in a loop, and every refault would otherwise be queued. So the
/// books of who waits for what live here, in the core's [`FaultBooks`].
struct State {
    /// One bit per guest page (the core's bitmap layout): placed by this
    /// module or found present.
    present: Vec<u64>,
    /// Guest pages.
    pages: u64,
    books: FaultBooks<Vec<u64>>,
    stats: PostcopyStats,
}

impl State {
    /// The present pages, as the core's bitmap over this state's words.
    fn present(&mut self) -> Option<DirtyBitmap<'_>> {
        DirtyBitmap::new(&mut self.present, self.pages).ok()
    }

    fn is_present(&mut self, gfn: u64) -> bool {
        self.present().is_some_and(|p| p.test(gfn))
    }

    fn set_present(&mut self, gfn: u64, on: bool) {
        if let Some(mut p) = self.present() {
            // A page outside guest RAM has no bit: nothing to record.
            let _ = if on { p.set(gfn) } else { p.clear(gfn) };
        }
    }

    /// Pages `first .. first + n` are present as of `at`: resolves their
    /// requests.
    fn arrived(&mut self, first: u64, n: u64, at: Instant) -> Result<(), PostcopyError> {
        for gfn in first..first + n {
            self.set_present(gfn, true);
        }
        self.books
            .placed(first, n, at)
            .map_err(PostcopyError::Books)
    }
}

/// Guest RAM registered with a userfaultfd in missing mode: the destination
/// side of postcopy.
///
/// Create it with [`PostcopyRam::register`] before the destination vCPU
/// first runs, [`discard`](PostcopyRam::discard) the pages the source says
/// are stale, [`place`](PostcopyRam::place) pages as they arrive, serve
/// faults with a [`FaultThread`], and [`unregister`](PostcopyRam::unregister)
/// once every page is present. Dropping it unregisters too.
pub struct PostcopyRam {
    ram: GuestMemory,
    uffd: Uffd,
    registered: AtomicBool,
    state: Mutex<State>,
}

impl fmt::Debug for PostcopyRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostcopyRam")
            .field("ram", &self.ram)
            .field("registered", &self.registered.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every critical section leaves the state consistent before it can
    // panic (bit sets and counter bumps), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PostcopyRam {
    /// Registers every region of `ram` with a new userfaultfd in missing mode.
    ///
    /// The userfaultfd is close-on-exec and non-blocking, asks for thread
    /// ids in fault events, and is *not* user-mode-only, so the vCPU's
    /// kernel-mode faults reach it. Pages already present in `ram` stay;
    /// every other page now blocks its first toucher until placed.
    pub fn register(ram: GuestMemory) -> Result<PostcopyRam, PostcopyError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::THREAD_ID)
            .require_ioctls(IoctlFlags::REGISTER | IoctlFlags::UNREGISTER)
            .create()
            .map_err(|e| {
                PostcopyError::Create(format!(
                    "{e} (errno {}; needs root or CAP_SYS_PTRACE for kernel-mode faults)",
                    uffd_errno(&e)
                ))
            })?;
        let needed = IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE;
        for slot in ram.regions() {
            let (host, len) = (slot.host_addr() as *mut libc::c_void, slot.len() as usize);
            // SAFETY: `host .. host + len` is the region's own mapping, alive as
            // long as `ram`; the advice changes no contents.
            unsafe { libc::madvise(host, len, libc::MADV_NOHUGEPAGE) };
            let ioctls = uffd
                .register(host, len)
                .map_err(|e| PostcopyError::Register {
                    gpa: slot.guest_phys(),
                    len: slot.len(),
                    errno: uffd_errno(&e),
                })?;
            if !ioctls.contains(needed) {
                return Err(PostcopyError::MissingIoctls(ioctls.bits()));
            }
        }
        let pages = ram.guest_end() / PAGE;
        Ok(PostcopyRam {
            state: Mutex::new(State {
                present: vec![0; words_for(pages)],
                pages,
                // One latency word per page: a migration requests a page
                // once (its discards come before the guest runs). A zeroed
                // allocation: only the words written take memory.
                books: FaultBooks::new(vec![0; pages as usize]),
                stats: PostcopyStats::default(),
            }),
            ram,
            uffd,
            registered: AtomicBool::new(true),
        })
    }

    /// The guest RAM this registration covers.
    pub fn ram(&self) -> &GuestMemory {
        &self.ram
    }

    fn check_registered(&self) -> Result<(), PostcopyError> {
        if self.registered.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(PostcopyError::NotRegistered)
        }
    }

    /// Splits `gpa .. gpa + len` (page aligned, non-empty, inside RAM) at
    /// region boundaries and calls `f(gpa, host, offset, len)` for each piece.
    fn for_each_piece(
        &self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(u64, *mut u8, usize, usize) -> Result<(), PostcopyError>,
    ) -> Result<(), PostcopyError> {
        if len == 0 || !gpa.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(PostcopyError::Misaligned { gpa, len });
        }
        let end = gpa
            .checked_add(len)
            .ok_or(MemoryError::RangeOutOfRam { gpa, len })?;
        // The whole range must be RAM before anything is placed.
        let mut at = gpa;
        while at < end {
            let (_, region) = self
                .ram
                .locate(at)
                .ok_or(MemoryError::RangeOutOfRam { gpa, len })?;
            at = region.guest_end().min(end);
        }
        let mut at = gpa;
        while at < end {
            let (_, region) = self
                .ram
                .locate(at)
                .ok_or(MemoryError::RangeOutOfRam { gpa, len })?;
            let piece = region.guest_end().min(end) - at;
            let (host, n) = self.ram.host_range(at, piece)?;
            f(at, host, (at - gpa) as usize, n)?;
            at += piece;
        }
        Ok(())
    }

    /// Installs `data` (whole pages) at guest-physical `gpa` with
    /// `UFFDIO_COPY`, contiguous pages in one call, waking every thread
    /// blocked on them. Pages already present are left as they are and
    /// counted in [`Placed::already_present`]: a page the guest may have
    /// written since must never be overwritten with an older copy.
    pub fn place(&self, gpa: u64, data: &[u8]) -> Result<Placed, PostcopyError> {
        self.check_registered()?;
        let mut placed = Placed::default();
        self.for_each_piece(gpa, data.len() as u64, |at, host, off, len| {
            let src = data[off..off + len].as_ptr();
            self.fill(at, host, len, Fill::Copy(src), &mut placed)
        })?;
        Ok(placed)
    }

    /// Installs `len` bytes of zero pages at `gpa` with `UFFDIO_ZEROPAGE`
    /// (no data crosses the wire for zero pages; this maps the shared zero
    /// page until the guest writes). Already-present pages are counted, as
    /// in [`PostcopyRam::place`].
    pub fn place_zero(&self, gpa: u64, len: u64) -> Result<Placed, PostcopyError> {
        self.check_registered()?;
        let mut placed = Placed::default();
        self.for_each_piece(gpa, len, |at, host, _, n| {
            self.fill(at, host, n, Fill::Zero, &mut placed)
        })?;
        Ok(placed)
    }

    /// Fills `host .. host + len` (guest-physical `gpa ..`, one slot),
    /// skipping present pages, and records what arrived.
    fn fill(
        &self,
        gpa: u64,
        host: *mut u8,
        len: usize,
        how: Fill,
        placed: &mut Placed,
    ) -> Result<(), PostcopyError> {
        let mut off = 0usize;
        let mut stalls = 0u32;
        while off < len {
            let (done, errno) = self.fill_once(host, off, len - off, how);
            let done = done.min(len - off);
            if done > 0 {
                stalls = 0;
                self.installed(gpa + off as u64, done as u64 / PAGE, how, placed)?;
                off += done;
            }
            match errno {
                None => {}
                Some(libc::EAGAIN) if done > 0 => {}
                Some(libc::EAGAIN) => {
                    stalls += 1;
                    if stalls >= MAX_NO_PROGRESS {
                        return Err(PostcopyError::NoProgress {
                            gpa: gpa + off as u64,
                        });
                    }
                }
                Some(libc::EEXIST) => {
                    // SAFETY: `off < len`, so the page lies inside the slot.
                    let page = unsafe { host.add(off) };
                    // Present already: whoever placed it woke its waiters,
                    // but a wake is cheap insurance against a lost one.
                    let _ = self.uffd.wake(page.cast(), PAGE_SIZE);
                    self.already_present(gpa + off as u64, placed)?;
                    off += PAGE_SIZE;
                }
                Some(errno) => {
                    let at = gpa + off as u64;
                    return Err(match how {
                        Fill::Copy(_) => PostcopyError::Copy { gpa: at, errno },
                        Fill::Zero => PostcopyError::Zeropage { gpa: at, errno },
                    });
                }
            }
        }
        Ok(())
    }

    /// One `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` of `host + off .. + len`:
    /// returns the bytes done and the errno, if any.
    fn fill_once(&self, host: *mut u8, off: usize, len: usize, how: Fill) -> (usize, Option<i32>) {
        let fd = self.uffd.as_raw_fd();
        let dst = host as u64 + off as u64;
        let (ret, count) = match how {
            Fill::Copy(src) => {
                let mut arg = UffdioCopy {
                    dst,
                    src: src as u64 + off as u64,
                    len: len as u64,
                    mode: 0,
                    copy: 0,
                };
                // SAFETY: `dst .. dst + len` lies inside a slot registered
                // with this userfaultfd (kept mapped by `self.ram`); `src ..
                // src + len` lies inside the caller's `data` slice, which the
                // kernel only reads; `arg` is a live `struct uffdio_copy`
                // that the kernel writes its count into. The kernel installs
                // whole pages atomically, so no reference to guest memory is
                // created or invalidated.
                let ret = unsafe { libc::ioctl(fd, UFFDIO_COPY as _, &mut arg) };
                (ret, arg.copy)
            }
            Fill::Zero => {
                let mut arg = UffdioZeropage {
                    range: UffdioRange {
                        start: dst,
                        len: len as u64,
                    },
                    mode: 0,
                    zeropage: 0,
                };
                // SAFETY: as for the copy; `arg` is a live `struct
                // uffdio_zeropage` and no source buffer is read.
                let ret = unsafe { libc::ioctl(fd, UFFDIO_ZEROPAGE as _, &mut arg) };
                (ret, arg.zeropage)
            }
        };
        // The errno must be read before anything else can clobber it.
        let errno = (ret != 0).then(last_errno);
        (usize::try_from(count).unwrap_or(0), errno)
    }

    fn installed(
        &self,
        gpa: u64,
        pages: u64,
        how: Fill,
        placed: &mut Placed,
    ) -> Result<(), PostcopyError> {
        placed.installed += pages;
        let now = clock::now();
        let mut st = lock(&self.state);
        match how {
            Fill::Copy(_) => st.stats.pages_copied += pages,
            Fill::Zero => st.stats.pages_zeroed += pages,
        }
        st.arrived(gpa / PAGE, pages, now)
    }

    fn already_present(&self, gpa: u64, placed: &mut Placed) -> Result<(), PostcopyError> {
        placed.already_present += 1;
        let now = clock::now();
        let mut st = lock(&self.state);
        st.stats.already_present += 1;
        st.arrived(gpa / PAGE, 1, now)
    }

    /// Drops the pages of `gpa .. gpa + len` (`madvise(MADV_DONTNEED)`), so
    /// the next touch faults and waits for a fresh copy: the source's list
    /// of pages dirtied after they were sent in precopy.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), PostcopyError> {
        self.check_registered()?;
        let mut st = lock(&self.state);
        self.for_each_piece(gpa, len, |at, host, _, n| {
            // SAFETY: `host .. host + n` lies inside a slot mapping owned by
            // `self.ram`; MADV_DONTNEED on private anonymous memory only drops
            // pages (no reference to guest memory exists to dangle).
            if unsafe { libc::madvise(host.cast(), n, libc::MADV_DONTNEED) } != 0 {
                return Err(PostcopyError::Discard {
                    gpa: at,
                    errno: last_errno(),
                });
            }
            Ok(())
        })?;
        for gfn in gpa / PAGE..(gpa + len) / PAGE {
            st.set_present(gfn, false);
        }
        st.stats.pages_discarded += len / PAGE;
        Ok(())
    }

    /// Whether guest page `gfn` is known to be present (placed through this
    /// registration, or found present by a placement). A background push
    /// skips such pages instead of reading and sending them again.
    pub fn is_present(&self, gfn: u64) -> bool {
        lock(&self.state).is_present(gfn)
    }

    /// Number of guest pages known to be present.
    pub fn present_pages(&self) -> u64 {
        lock(&self.state).present().map_or(0, |p| p.count())
    }

    /// Ends postcopy: unregisters every region (faults are no longer caught,
    /// a missing page is then plain zero-filled memory) and restores the
    /// huge-page hint. Later placements and discards are refused.
    pub fn unregister(&self) -> Result<(), PostcopyError> {
        if !self.registered.swap(false, Ordering::AcqRel) {
            return Err(PostcopyError::NotRegistered);
        }
        for slot in self.ram.regions() {
            let (host, len) = (slot.host_addr() as *mut libc::c_void, slot.len() as usize);
            self.uffd
                .unregister(host, len)
                .map_err(|e| PostcopyError::Unregister {
                    gpa: slot.guest_phys(),
                    errno: uffd_errno(&e),
                })?;
            // SAFETY: the region's own live mapping; advice only.
            unsafe { libc::madvise(host, len, libc::MADV_HUGEPAGE) };
        }
        Ok(())
    }

    /// Whether the RAM is still registered.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// A snapshot of the counters, fault latency percentiles and per-thread
    /// blocktime.
    pub fn stats(&self) -> PostcopyStats {
        let mut st = lock(&self.state);
        let mut out = st.stats.clone();
        out.outstanding = st.books.outstanding();
        out.faults_duplicate = st.books.duplicates();
        out.latency_samples = st.books.samples();
        let us = |d: Duration| d.as_nanos() as f64 / 1000.0;
        out.latency_median_us = st.books.latency_percentile(50).map(us);
        out.latency_p99_us = st.books.latency_percentile(99).map(us);
        out.latencies_ns = st.books.latencies_ns().to_vec();
        out.blocktime = st
            .books
            .blocktime()
            .iter()
            .map(|&(tid, d)| (tid as i32, d))
            .collect();
        drop(st);
        out.blocktime.sort_unstable();
        out
    }

    /// Explains a VMM's vCPU exit for MMIO at guest-physical `addr`: when
    /// `addr` is inside this registered RAM, KVM's fault was not delivered
    /// to userfaultfd (a user-mode-only userfaultfd was used) and the page
    /// looked missing. `None` when the address is not guest RAM here.
    pub fn explain_mmio_exit(&self, addr: u64) -> Option<PostcopyError> {
        (self.is_registered() && self.ram.locate(addr).is_some())
            .then_some(PostcopyError::FaultNotDelivered { addr })
    }

    /// Host address → page-aligned guest-physical address.
    fn gpa_of(&self, host_addr: u64) -> Option<u64> {
        self.ram.regions().iter().find_map(|s| {
            let off = host_addr.checked_sub(s.host_addr())?;
            (off < s.len()).then(|| s.guest_phys() + off / PAGE * PAGE)
        })
    }

    /// Handles one fault event read at `at`; returns the fault to forward,
    /// if it is the first outstanding one for its page.
    fn on_fault(
        &self,
        host_addr: u64,
        tid: i32,
        write: bool,
        at: Instant,
    ) -> Result<Option<Fault>, PostcopyError> {
        let gpa = self
            .gpa_of(host_addr)
            .ok_or(PostcopyError::FaultOutsideRam { host_addr })?;
        let gfn = gpa / PAGE;
        let mut st = lock(&self.state);
        st.stats.faults_read += 1;
        if st.is_present(gfn) {
            // Placed between the fault and this read; the placement woke
            // the thread.
            st.stats.faults_stale += 1;
            return Ok(None);
        }
        // Thread ids are positive.
        let first = st
            .books
            .fault(gfn, tid.unsigned_abs(), at)
            .map_err(PostcopyError::Books)?;
        if first {
            st.stats.faults_forwarded += 1;
            Ok(Some(Fault { gpa, tid, write }))
        } else {
            Ok(None)
        }
    }

    /// Starts a thread that reads fault events and calls `sink` once per
    /// page that needs requesting (outside any lock, so `sink` may place
    /// pages itself). Stop it with [`FaultThread::stop`] (or by dropping
    /// it); it also stops on the first error, which `stop` returns.
    pub fn start_fault_thread<F>(self: &Arc<Self>, sink: F) -> Result<FaultThread, PostcopyError>
    where
        F: FnMut(Fault) + Send + 'static,
    {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(PostcopyError::Sys("eventfd", last_errno()));
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let shutdown = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let ram = Arc::clone(self);
        let stop = Arc::clone(&shutdown);
        let handle = std::thread::Builder::new()
            .name("livemig-uffd".into())
            .spawn(move || fault_loop(&ram, &stop, sink))
            .map_err(|e| PostcopyError::Spawn(e.to_string()))?;
        Ok(FaultThread {
            shutdown,
            handle: Some(handle),
        })
    }
}

impl AsFd for PostcopyRam {
    /// The userfaultfd, for an engine that polls it in its own event loop
    /// instead of running a [`FaultThread`].
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}

impl Drop for PostcopyRam {
    fn drop(&mut self) {
        if self.is_registered() {
            // Closing the userfaultfd unregisters anyway; this also restores
            // the huge-page hint.
            let _ = self.unregister();
        }
    }
}

/// The thread reading fault events (see [`PostcopyRam::start_fault_thread`]).
#[derive(Debug)]
pub struct FaultThread {
    shutdown: Arc<OwnedFd>,
    handle: Option<JoinHandle<Result<(), PostcopyError>>>,
}

impl FaultThread {
    fn signal(&self) -> Result<(), PostcopyError> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to our eventfd.
        let n = unsafe { libc::write(self.shutdown.as_raw_fd(), one.as_ptr().cast(), 8) };
        // EAGAIN: the counter is already non-zero, the thread will see it.
        if n != 8 && last_errno() != libc::EAGAIN {
            return Err(PostcopyError::Sys("eventfd write", last_errno()));
        }
        Ok(())
    }

    /// Stops the thread and returns the error it stopped on, if any.
    /// Faults still unread stay queued in the userfaultfd.
    pub fn stop(mut self) -> Result<(), PostcopyError> {
        self.signal()?;
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(PostcopyError::FaultThreadPanicked),
            None => Ok(()),
        }
    }

    /// Whether the thread has ended (on an error, or after a stop).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            // Nothing to report from a drop: a failed signal only happens on a
            // broken fd, and then the join would hang, so it is skipped.
            if self.signal().is_ok() {
                let _ = h.join();
            }
        }
    }
}

fn fault_loop<F: FnMut(Fault)>(
    ram: &PostcopyRam,
    shutdown: &OwnedFd,
    mut sink: F,
) -> Result<(), PostcopyError> {
    let mut buf = EventBuffer::new(EVENT_BATCH);
    let mut forward = Vec::with_capacity(EVENT_BATCH);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: ram.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shutdown.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            match last_errno() {
                libc::EINTR => continue,
                e => return Err(PostcopyError::Sys("poll", e)),
            }
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        let rev = fds[0].revents;
        if rev & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(PostcopyError::Sys("poll (userfaultfd error)", libc::EIO));
        }
        if rev & libc::POLLIN == 0 {
            continue;
        }
        let at = clock::now();
        let events = ram
            .uffd
            .read_events(&mut buf)
            .map_err(|e| PostcopyError::ReadEvents(format!("{e} (errno {})", uffd_errno(&e))))?;
        for ev in events {
            let ev = ev.map_err(|e| PostcopyError::ReadEvents(e.to_string()))?;
            // Only page faults are enabled (no fork/remap/remove events).
            if let Event::Pagefault {
                addr,
                rw,
                thread_id,
                ..
            } = ev
            {
                let write = rw == ReadWrite::Write;
                if let Some(f) = ram.on_fault(addr as u64, thread_id.as_raw(), write, at)? {
                    forward.push(f);
                }
            }
        }
        for f in forward.drain(..) {
            sink(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_headers() {
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xC020_AA04);
    }

    #[test]
    fn an_undelivered_fault_names_userfaultfd() {
        let msg = PostcopyError::FaultNotDelivered { addr: 0x20_0000 }.to_string();
        assert!(
            msg.contains("userfaultfd") && msg.contains("0x200000"),
            "{msg}"
        );
    }
}
