//! `livemig bench --case first-touch`: what a destination pays per page
//! to land bytes in guest RAM never touched before, against the same
//! bytes into a buffer reused again and again, in the same run.
//!
//! A multifd destination writes every page it receives into fresh
//! anonymous memory, so each page's first write is a page fault (several
//! microseconds under a nested KVM, see `/work/shared/machine-notes.md`);
//! the raw TCP sink `bench` compares it with reuses one buffer. This case
//! separates the two costs and tries the ways around the fault: huge
//! pages (`MADV_HUGEPAGE`), `MAP_POPULATE`, and `MADV_POPULATE_WRITE`
//! (Linux 5.14+) either just before each chunk is written or from a helper
//! thread ahead of the writer. Each way is timed for a `memcpy` and for a
//! `read` from a loopback TCP socket (what the destination's `readv` does),
//! chunk by chunk as the destination's packets arrive. It also times the
//! verification's page hash ([`GuestMemory::page_term`]) over pages in a
//! core's cache and over pages read from memory, the two ways a receiver
//! can order its reads and its hashing.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Instant;

use livemig_core::digest::DigestKey;
use livemig_kvm::memory::{GuestMemory, MemoryError, RegionLayout};

use crate::bench::Spread;

/// The case's name (`--case first-touch`).
pub const FIRST_TOUCH_CASE: &str = "first-touch";

/// How much each chunk's write covers: a 16-page piece of a packet.
const CHUNK: usize = 64 << 10;
/// How far a helper thread populates at a time, and how far ahead of the
/// writer it may run at most.
const AHEAD_STEP: usize = 2 << 20;
const PAGE: usize = 4096;

/// Where the bytes land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One chunk-sized buffer, written again and again (already mapped).
    Reused,
    /// A fresh private anonymous mapping advised `MADV_NOHUGEPAGE`: one
    /// fault per 4 KiB page.
    Fresh,
    /// A fresh mapping advised `MADV_HUGEPAGE`: one fault per 2 MiB when
    /// the kernel has a huge page to give.
    FreshThp,
    /// A fresh mapping made with `MAP_POPULATE` (4 KiB pages), the
    /// population timed with the writes.
    MapPopulate,
    /// A fresh 4 KiB mapping, each chunk populated with
    /// `MADV_POPULATE_WRITE` by the writer just before it writes it.
    PopulateInline,
    /// A fresh 4 KiB mapping populated with `MADV_POPULATE_WRITE` by a
    /// helper thread, `AHEAD_STEP` at a time, ahead of the writer (which
    /// waits for it where it has not got to yet).
    PopulateAhead,
}

impl Target {
    /// Every target, in table order.
    pub const ALL: [Target; 6] = [
        Target::Reused,
        Target::Fresh,
        Target::FreshThp,
        Target::MapPopulate,
        Target::PopulateInline,
        Target::PopulateAhead,
    ];

    /// The table's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Target::Reused => "reused buffer",
            Target::Fresh => "fresh 4K",
            Target::FreshThp => "fresh MADV_HUGEPAGE",
            Target::MapPopulate => "MAP_POPULATE",
            Target::PopulateInline => "POPULATE_WRITE inline",
            Target::PopulateAhead => "POPULATE_WRITE ahead",
        }
    }
}

/// What writes the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// `memcpy` from a chunk-sized source buffer.
    Memcpy,
    /// `read` from a loopback TCP socket another thread writes to.
    Socket,
}

/// Why the case could not run.
#[derive(Debug)]
pub enum TouchError {
    /// `mmap` refused.
    Mmap(std::io::Error),
    /// `madvise` refused (`MADV_POPULATE_WRITE` needs Linux 5.14).
    Madvise(&'static str, std::io::Error),
    /// The loopback socket failed.
    Socket(std::io::Error),
    /// The sending thread panicked or the socket closed early.
    Sender(String),
    /// A chunk did not hold the bytes written into it.
    Mismatch(usize),
    /// The hashed memory could not be made or read.
    Memory(MemoryError),
}

impl std::fmt::Display for TouchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TouchError::Mmap(e) => write!(f, "bench --case first-touch: mmap: {e}"),
            TouchError::Madvise(what, e) => {
                write!(f, "bench --case first-touch: madvise({what}): {e}")
            }
            TouchError::Socket(e) => write!(f, "bench --case first-touch: loopback socket: {e}"),
            TouchError::Sender(e) => write!(f, "bench --case first-touch: sender: {e}"),
            TouchError::Memory(e) => write!(f, "bench --case first-touch: hash: {e}"),
            TouchError::Mismatch(at) => {
                write!(
                    f,
                    "bench --case first-touch: the chunk at {at} lost its bytes"
                )
            }
        }
    }
}

impl std::error::Error for TouchError {}

/// A private anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the threads
// that share it (the writer and a populating helper) never form
// references over it, only pass its addresses to the kernel or to
// `copy_nonoverlapping`, each on ranges the other does not write.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize, extra_flags: libc::c_int) -> Result<Mapping, TouchError> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected
        // and the result is checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | extra_flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(TouchError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    fn advise(&self, at: usize, len: usize, advice: libc::c_int) -> Result<(), TouchError> {
        let len = len.min(self.len.saturating_sub(at));
        // SAFETY: `at .. at + len` lies inside this mapping (clamped above).
        let r = unsafe { libc::madvise(self.ptr.add(at).cast(), len, advice) };
        if r != 0 {
            let what = match advice {
                libc::MADV_HUGEPAGE => "MADV_HUGEPAGE",
                libc::MADV_NOHUGEPAGE => "MADV_NOHUGEPAGE",
                _ => "MADV_POPULATE_WRITE",
            };
            return Err(TouchError::Madvise(what, std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned; nothing refers to it any more
        // (the helper thread was joined before).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One measurement: `bytes` landed in `ns`.
#[derive(Debug, Clone, Copy)]
pub struct Touch {
    /// Where they landed.
    pub target: Target,
    /// What wrote them.
    pub writer: Writer,
    /// Bytes written.
    pub bytes: usize,
    /// Time from before the mapping was made to the last byte written.
    pub ns: u64,
}

impl Touch {
    /// Microseconds per 4 KiB page.
    pub fn us_per_page(&self) -> f64 {
        self.ns as f64 / 1e3 / (self.bytes / PAGE) as f64
    }

    /// GB/s.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.ns as f64
    }
}

/// The byte source of one measurement.
enum Feed {
    Memcpy(Vec<u8>),
    Socket(TcpStream, thread::JoinHandle<std::io::Result<()>>),
}

impl Feed {
    fn start(writer: Writer, bytes: usize) -> Result<Feed, TouchError> {
        let data = pattern();
        match writer {
            Writer::Memcpy => Ok(Feed::Memcpy(data)),
            Writer::Socket => {
                let listener = TcpListener::bind("127.0.0.1:0").map_err(TouchError::Socket)?;
                let addr = listener.local_addr().map_err(TouchError::Socket)?;
                let sender = thread::spawn(move || -> std::io::Result<()> {
                    let mut s = TcpStream::connect(addr)?;
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(data.len());
                        s.write_all(&data[..n])?;
                        left -= n;
                    }
                    Ok(())
                });
                let (conn, _) = listener.accept().map_err(TouchError::Socket)?;
                Ok(Feed::Socket(conn, sender))
            }
        }
    }

    /// Fills `len` bytes at `dst` (inside a live mapping).
    fn fill(&mut self, dst: *mut u8, len: usize) -> Result<(), TouchError> {
        match self {
            Feed::Memcpy(data) => {
                // SAFETY: `dst .. dst + len` is inside a writable mapping
                // the caller owns, `len <= CHUNK == data.len()`, and the
                // two never overlap (the mapping is not the Vec's).
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, len) };
                Ok(())
            }
            Feed::Socket(conn, _) => {
                let mut at = 0;
                while at < len {
                    // SAFETY: `dst + at .. dst + len` is inside a writable
                    // mapping the caller owns; the kernel writes only there.
                    let n = unsafe { libc::read(conn.as_raw_fd(), dst.add(at).cast(), len - at) };
                    match n {
                        0 => return Err(TouchError::Sender("closed early".into())),
                        n if n < 0 => {
                            let e = std::io::Error::last_os_error();
                            if e.kind() != std::io::ErrorKind::Interrupted {
                                return Err(TouchError::Socket(e));
                            }
                        }
                        n => at += n as usize,
                    }
                }
                Ok(())
            }
        }
    }

    fn finish(self) -> Result<(), TouchError> {
        if let Feed::Socket(conn, sender) = self {
            drop(conn);
            sender
                .join()
                .map_err(|_| TouchError::Sender("panicked".into()))?
                .map_err(TouchError::Socket)?;
        }
        Ok(())
    }
}

/// Lands `bytes` in `target` with `writer`, chunk by chunk, and times it
/// (mapping, advice and population included; the unmap not).
pub fn measure(target: Target, writer: Writer, bytes: usize) -> Result<Touch, TouchError> {
    let bytes = bytes.max(CHUNK) / CHUNK * CHUNK;
    let mut feed = Feed::start(writer, bytes)?;
    let start = Instant::now();
    let len = if target == Target::Reused {
        CHUNK
    } else {
        bytes
    };
    let flags = if target == Target::MapPopulate {
        libc::MAP_POPULATE
    } else {
        0
    };
    let map = Arc::new(Mapping::new(len, flags)?);
    match target {
        Target::FreshThp => map.advise(0, len, libc::MADV_HUGEPAGE)?,
        Target::Reused => {}
        _ => map.advise(0, len, libc::MADV_NOHUGEPAGE)?,
    }
    // How far the helper has populated (PopulateAhead), and how far the
    // writer has written, so the helper stays at most a step or two ahead.
    let populated = Arc::new(AtomicUsize::new(0));
    let written = Arc::new(AtomicUsize::new(0));
    let helper = (target == Target::PopulateAhead).then(|| {
        let (map, populated, written) = (map.clone(), populated.clone(), written.clone());
        thread::spawn(move || -> Result<(), TouchError> {
            let mut at = 0;
            while at < map.len {
                while at > written.load(Ordering::Acquire) + 2 * AHEAD_STEP {
                    thread::yield_now();
                }
                map.advise(at, AHEAD_STEP, libc::MADV_POPULATE_WRITE)?;
                at += AHEAD_STEP;
                populated.store(at, Ordering::Release);
            }
            Ok(())
        })
    });
    let mut at = 0;
    let mut result = Ok(());
    while at < bytes {
        let dst_at = if target == Target::Reused { 0 } else { at };
        if target == Target::PopulateInline
            && let Err(e) = map.advise(dst_at, CHUNK, libc::MADV_POPULATE_WRITE)
        {
            result = Err(e);
            break;
        }
        if target == Target::PopulateAhead {
            while populated.load(Ordering::Acquire) < at + CHUNK
                && helper.as_ref().is_some_and(|h| !h.is_finished())
            {
                std::hint::spin_loop();
            }
        }
        // SAFETY: `dst_at + CHUNK <= len`: the mapping holds `bytes` (or,
        // reused, one chunk at 0).
        let dst = unsafe { map.ptr.add(dst_at) };
        if let Err(e) = feed.fill(dst, CHUNK) {
            result = Err(e);
            break;
        }
        at += CHUNK;
        written.store(at, Ordering::Release);
    }
    let ns = start.elapsed().as_nanos() as u64;
    written.store(usize::MAX / 2, Ordering::Release);
    if let Some(h) = helper {
        h.join()
            .map_err(|_| TouchError::Sender("the populating thread panicked".into()))??;
    }
    result?;
    feed.finish()?;
    check(&map, bytes.min(len))?;
    Ok(Touch {
        target,
        writer,
        bytes,
        ns,
    })
}

/// Every chunk of the first `len` bytes of `map` holds [`pattern`]'s
/// bytes: the write really landed (checked after the timing).
fn check(map: &Mapping, len: usize) -> Result<(), TouchError> {
    let want = pattern();
    for at in (0..len).step_by(CHUNK) {
        // SAFETY: `at + CHUNK <= len <= map.len`; no thread writes the
        // mapping any more (the writer is this thread, the helper joined).
        let same = unsafe { libc::memcmp(map.ptr.add(at).cast(), want.as_ptr().cast(), CHUNK) };
        if same != 0 {
            return Err(TouchError::Mismatch(at));
        }
    }
    Ok(())
}

/// The bytes every chunk is written with.
fn pattern() -> Vec<u8> {
    (0..CHUNK).map(|i| (i * 7 + 1) as u8).collect()
}

/// The page hash's cost, us per page: over one chunk's pages hashed
/// again and again (in cache, as right after a chunk's read) and over
/// `mib` MiB hashed once each (from memory, as after a whole packet's
/// read). Both over the same non-zero bytes, the memory populated first.
#[derive(Debug, Clone, Copy)]
pub struct HashCost {
    /// In cache.
    pub hot_us: f64,
    /// From memory.
    pub cold_us: f64,
}

/// Measures [`HashCost`] over `mib` MiB.
pub fn hash_cost(mib: usize) -> Result<HashCost, TouchError> {
    let bytes = (mib.max(1) << 20) as u64;
    let layout = RegionLayout::contiguous("hash", bytes, bytes).map_err(TouchError::Memory)?;
    let ram = GuestMemory::anonymous(&layout).map_err(TouchError::Memory)?;
    let data = pattern();
    for at in (0..bytes).step_by(CHUNK) {
        ram.write(at, &data).map_err(TouchError::Memory)?;
    }
    let key = DigestKey::new(0x5EED);
    let pages = bytes / PAGE as u64;
    let chunk_pages = (CHUNK / PAGE) as u64;
    let mut sink = 0u64;
    let hash = |range: std::ops::Range<u64>, sink: &mut u64| -> Result<(), TouchError> {
        for page in range {
            let term = ram.page_term(0, page, &key).map_err(TouchError::Memory)?;
            *sink = sink.wrapping_add(term);
        }
        Ok(())
    };
    let start = Instant::now();
    for _ in 0..pages / chunk_pages {
        hash(0..chunk_pages, &mut sink)?;
    }
    let hot_ns = start.elapsed().as_nanos() as f64;
    let start = Instant::now();
    hash(0..pages, &mut sink)?;
    let cold_ns = start.elapsed().as_nanos() as f64;
    // Every term of non-zero bytes is non-zero: the sum is used, so the
    // hashing cannot be optimised away, and a zero sum would be wrong.
    if sink == 0 {
        return Err(TouchError::Mismatch(0));
    }
    let per_page = |ns: f64| ns / 1e3 / pages as f64;
    Ok(HashCost {
        hot_us: per_page(hot_ns),
        cold_us: per_page(cold_ns),
    })
}

/// `runs` rounds of every target with both writers, each of `mib` MiB,
/// alternating within a round.
pub fn run(mib: usize, runs: usize, verbose: bool) -> Result<Vec<Touch>, TouchError> {
    let mut out = Vec::new();
    for round in 1..=runs {
        for writer in [Writer::Memcpy, Writer::Socket] {
            for target in Target::ALL {
                let t = measure(target, writer, mib << 20)?;
                if verbose {
                    eprintln!(
                        "bench: first-touch round {round}/{runs}: {:?} into {}: {:.2} us/page, {:.2} GB/s",
                        writer,
                        target.name(),
                        t.us_per_page(),
                        t.gbps()
                    );
                }
                out.push(t);
            }
        }
    }
    Ok(out)
}

/// The kernel's transparent huge page settings, as the table's footer
/// names them.
fn thp_setting(name: &str) -> String {
    std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{name}"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The medians as a table: per target, us/page and GB/s by memcpy and by
/// socket read; then the hash's cost in cache and from memory.
pub fn table(runs: &[Touch], hashes: &[HashCost], mib: usize) -> String {
    let median = |t: Target, w: Writer, f: fn(&Touch) -> f64| {
        Spread::of(
            runs.iter()
                .filter(|r| r.target == t && r.writer == w)
                .map(f),
        )
        .map(|s| s.median)
    };
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    let mut s = format!(
        "{:<22} {:>13} {:>11} {:>13} {:>11}\n",
        "target", "memcpy us/pg", "memcpy GB/s", "socket us/pg", "socket GB/s"
    );
    for t in Target::ALL {
        let _ = writeln!(
            s,
            "{:<22} {:>13} {:>11} {:>13} {:>11}",
            t.name(),
            fmt(median(t, Writer::Memcpy, Touch::us_per_page)),
            fmt(median(t, Writer::Memcpy, Touch::gbps)),
            fmt(median(t, Writer::Socket, Touch::us_per_page)),
            fmt(median(t, Writer::Socket, Touch::gbps)),
        );
    }
    // Three decimals: a page's hash in cache is a few hundredths of a us.
    let hash = |f: fn(&HashCost) -> f64| {
        Spread::of(hashes.iter().map(f)).map_or("-".into(), |s| format!("{:.3}", s.median))
    };
    let _ = writeln!(
        s,
        "page hash (verification), us/page: {} in cache ({} KiB hashed again and again), \
         {} from memory",
        hash(|h| h.hot_us),
        CHUNK >> 10,
        hash(|h| h.cold_us),
    );
    let _ = writeln!(
        s,
        "\n{mib} MiB per measurement, written {} KiB at a time (medians); times include mmap, \
         advice and population, not munmap;\nsocket: read() from a loopback TCP stream; \
         THP enabled: {}, defrag: {}",
        CHUNK >> 10,
        thp_setting("enabled"),
        thp_setting("defrag")
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_lands_every_byte_by_both_writers() {
        for writer in [Writer::Memcpy, Writer::Socket] {
            for target in Target::ALL {
                // `measure` compares every chunk with the pattern written.
                let t = measure(target, writer, 4 << 20).unwrap();
                assert_eq!(t.bytes, 4 << 20, "{target:?} {writer:?}");
            }
        }
    }

    #[test]
    fn the_hash_is_timed_over_real_terms() {
        // `hash_cost` fails if the terms of its non-zero pages sum to 0.
        let h = hash_cost(1).unwrap();
        assert!(h.hot_us.is_finite() && h.cold_us.is_finite());
    }
}
