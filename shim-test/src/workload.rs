//! A deterministic guest that dirties memory at a fixed rate.
//!
//! Precopy convergence depends on how fast the guest re-dirties pages
//! compared with the link bandwidth, so tests need a guest whose dirtying is
//! exactly reproducible: a [`Workload`] writes a seeded pseudo-random
//! sequence of pages inside a working set at a fixed number of pages per
//! simulated second, stamping each page and marking the dirty log as KVM
//! would. The harness calls [`Workload::advance`] for every stretch of
//! simulated time during which the vCPUs run, and stops calling it once the
//! source stops them. On a postcopy destination the harness uses
//! [`Workload::advance_until_fault`] instead: a write to a page that has not
//! arrived blocks the guest and comes back as a [`Fault`], which the harness
//! turns into a page request, as the userfaultfd thread does for real.
//!
//! Every write stamps the page with a [`Stamp`] (page index and a
//! generation number that increases with each write) in its first 16 bytes,
//! plus seed-derived bytes elsewhere so pages differ from one another: after
//! a migration a test can check not only that the memories are equal but
//! that the destination holds the *latest* generation of each page.
//!
//! [`fill`] pre-populates memory with nonzero pages so a simulated guest is
//! not all zero pages (which the engines send as tiny zero-page records).

use std::fmt;

use crate::dirty_log::{DirtyLogError, SimDirtyLog};
use crate::memory::{MemoryError, SimRam};

/// Why a workload could not be built or run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadError {
    /// The working set is empty or does not lie inside its block.
    BadWorkingSet {
        /// The rejected working set.
        set: WorkingSet,
        /// Pages in the block (0 if the block does not exist).
        block_pages: u64,
    },
    /// `advance` was called with `to_ns` earlier than `from_ns`.
    BackwardsInterval {
        /// Start of the interval.
        from_ns: u64,
        /// End of the interval.
        to_ns: u64,
    },
    /// `fill` was asked for more pages than memory has.
    TooManyPages {
        /// Pages requested.
        requested: u64,
        /// Pages in memory.
        total: u64,
    },
    /// A write was refused by the memory (it does not match the layout the
    /// workload was built for).
    Memory(MemoryError),
    /// A mark was refused by the dirty log (it does not match the memory's
    /// layout).
    DirtyLog(DirtyLogError),
    /// A burst with no period, a busy part longer than the period, or no
    /// writes while busy.
    BadBurst(Burst),
}

impl fmt::Display for WorkloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadError::BadWorkingSet { set, block_pages } => write!(
                f,
                "working set of {} pages at page {} of block {} does not fit a block of {} pages",
                set.pages, set.first_page, set.block, block_pages
            ),
            WorkloadError::BackwardsInterval { from_ns, to_ns } => {
                write!(
                    f,
                    "workload interval ends at {to_ns} ns, before its start {from_ns} ns"
                )
            }
            WorkloadError::TooManyPages { requested, total } => {
                write!(
                    f,
                    "cannot fill {requested} pages of a memory of {total} pages"
                )
            }
            WorkloadError::BadBurst(b) => write!(
                f,
                "burst of {} ns at {} pages/s every {} ns is not a burst",
                b.busy_ns, b.busy_rate_pages_per_sec, b.period_ns
            ),
            WorkloadError::Memory(e) => write!(f, "workload write: {e}"),
            WorkloadError::DirtyLog(e) => write!(f, "workload dirty-log mark: {e}"),
        }
    }
}

impl std::error::Error for WorkloadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WorkloadError::Memory(e) => Some(e),
            WorkloadError::DirtyLog(e) => Some(e),
            _ => None,
        }
    }
}

impl From<MemoryError> for WorkloadError {
    fn from(e: MemoryError) -> Self {
        WorkloadError::Memory(e)
    }
}

impl From<DirtyLogError> for WorkloadError {
    fn from(e: DirtyLogError) -> Self {
        WorkloadError::DirtyLog(e)
    }
}

/// The pages a workload writes: `pages` pages of block `block` starting at
/// `first_page`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkingSet {
    /// Block index in the [`SimRam`] layout.
    pub block: usize,
    /// First page of the set.
    pub first_page: u64,
    /// Number of pages in the set (at least 1).
    pub pages: u64,
}

/// What a workload write leaves in the first 16 bytes of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// Index of the page within its block (little-endian u64 at offset 0).
    pub page: u64,
    /// Generation: the workload's write count at this write, starting at 1
    /// (little-endian u64 at offset 8). Later writes have larger ones.
    pub generation: u64,
}

impl Stamp {
    /// Reads the stamp from the start of a page; `None` if the page is
    /// shorter than 16 bytes or carries no stamp (generation 0).
    pub fn read(page: &[u8]) -> Option<Stamp> {
        let word = |i: usize| -> Option<u64> {
            let mut w = [0u8; 8];
            w.copy_from_slice(page.get(i..i + 8)?);
            Some(u64::from_le_bytes(w))
        };
        let stamp = Stamp {
            page: word(0)?,
            generation: word(8)?,
        };
        (stamp.generation != 0).then_some(stamp)
    }
}

/// Nanoseconds per simulated second.
const NS_PER_SEC: u128 = 1_000_000_000;

/// A guest that writes in bursts: for the first `busy_ns` of every
/// `period_ns` of its running time it writes at `busy_rate_pages_per_sec`,
/// for the rest at the workload's base rate. A switchover rule that judges
/// passes sees remainders jump from pass to pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Burst {
    /// Length of one busy-then-quiet cycle (at least 1).
    pub period_ns: u64,
    /// Busy part of each cycle (at most the period).
    pub busy_ns: u64,
    /// Writes per second while busy (at least 1).
    pub busy_rate_pages_per_sec: u64,
}

/// A guest write that could not happen because its page is not present
/// yet: a postcopy page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fault {
    /// Block of the missing page.
    pub block: usize,
    /// The missing page.
    pub page: u64,
    /// Simulated time at which the vCPU touched it and blocked.
    pub at_ns: u64,
}

/// What one [`Workload::advance_until_fault`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Advance {
    /// Writes performed.
    pub writes: u64,
    /// The write that blocked on a missing page, if one did; the rest of
    /// the interval was spent blocked.
    pub fault: Option<Fault>,
}

/// A seeded guest dirtying a working set at a fixed rate.
///
/// The rate is kept in the guest's own running time (the sum of the
/// intervals it was advanced over, less time blocked on faults): write `k`
/// happens once the guest has run `k / rate` seconds. Gaps between intervals
/// (vCPUs stopped) therefore cost no writes, and fractional writes carry
/// from one interval to the next, so the long-run rate is exact.
#[derive(Clone, Debug)]
pub struct Workload {
    set: WorkingSet,
    rate_pages_per_sec: u64,
    seed: u64,
    rng: fastrand::Rng,
    writes: u64,
    /// Nanoseconds the guest has been running (not stopped, not blocked).
    ran_ns: u64,
    /// A page chosen for the next write that faulted: retried first.
    blocked_on: Option<u64>,
    page_size: usize,
    burst: Option<Burst>,
}

impl Workload {
    /// A workload writing `rate_pages_per_sec` pages per simulated second,
    /// chosen uniformly in `set` by a PRNG seeded with `seed`. Fails if the
    /// set is empty or outside its block in `ram`.
    pub fn new(
        ram: &SimRam,
        set: WorkingSet,
        rate_pages_per_sec: u64,
        seed: u64,
    ) -> Result<Self, WorkloadError> {
        let spec = ram.blocks().get(set.block);
        let block_pages = spec.map_or(0, |s| s.pages);
        let fits = set.pages > 0
            && set
                .first_page
                .checked_add(set.pages)
                .is_some_and(|end| end <= block_pages);
        let (true, Some(spec)) = (fits, spec) else {
            return Err(WorkloadError::BadWorkingSet { set, block_pages });
        };
        Ok(Workload {
            set,
            rate_pages_per_sec,
            seed,
            rng: fastrand::Rng::with_seed(seed),
            writes: 0,
            ran_ns: 0,
            blocked_on: None,
            page_size: spec.page_size,
            burst: None,
        })
    }

    /// The same workload writing in bursts (see [`Burst`]). Fails if the
    /// burst has no period, a busy part longer than it, or no busy rate.
    pub fn with_burst(self, burst: Burst) -> Result<Self, WorkloadError> {
        if burst.period_ns == 0
            || burst.busy_ns > burst.period_ns
            || burst.busy_rate_pages_per_sec == 0
        {
            return Err(WorkloadError::BadBurst(burst));
        }
        Ok(Workload {
            burst: Some(burst),
            ..self
        })
    }

    /// The working set.
    pub fn working_set(&self) -> WorkingSet {
        self.set
    }

    /// The dirty rate in pages per simulated second.
    pub fn rate_pages_per_sec(&self) -> u64 {
        self.rate_pages_per_sec
    }

    /// Total writes performed so far (= the newest generation stamped).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Writes due after running `t_ns`: `floor(rate * t)` (with bursts,
    /// the integral of the rate over `t`), clamped (the products fit u128;
    /// only a 585-year run at 2^64 pages/s would clamp).
    fn due(&self, t_ns: u64) -> u64 {
        let n = self.page_ns(t_ns) / NS_PER_SEC;
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// Pages times nanoseconds written in the first `t_ns` of running
    /// time: the rate's integral, in units of 1e-9 pages.
    fn page_ns(&self, t_ns: u64) -> u128 {
        let rate = u128::from(self.rate_pages_per_sec);
        let Some(b) = self.burst else {
            return rate * u128::from(t_ns);
        };
        let busy_rate = u128::from(b.busy_rate_pages_per_sec);
        let (busy, quiet) = (u128::from(b.busy_ns), u128::from(b.period_ns - b.busy_ns));
        let (cycles, rest) = (
            u128::from(t_ns / b.period_ns),
            u128::from(t_ns % b.period_ns),
        );
        cycles * (busy_rate * busy + rate * quiet)
            + busy_rate * rest.min(busy)
            + rate * rest.saturating_sub(busy)
    }

    /// Running time at which write number `k` (from 1) is due: the first
    /// time at which [`due`](Self::due) reaches `k` (`ceil(k / rate)`
    /// without bursts). Only called for writes that are due, so the rate
    /// is not zero everywhere.
    fn due_at(&self, k: u64) -> u64 {
        let target = u128::from(k) * NS_PER_SEC;
        let rate = u128::from(self.rate_pages_per_sec);
        let t = match self.burst {
            None => target.div_ceil(rate.max(1)),
            Some(b) => {
                let busy_rate = u128::from(b.busy_rate_pages_per_sec);
                let busy = u128::from(b.busy_ns);
                let period = u128::from(b.period_ns);
                let per_cycle = busy_rate * busy + rate * (period - busy);
                // Whole cycles before the one in which the write falls,
                // then the time into that one.
                let cycles = (target - 1) / per_cycle.max(1);
                let left = target - cycles * per_cycle;
                let into = if left <= busy_rate * busy {
                    left.div_ceil(busy_rate)
                } else {
                    busy + (left - busy_rate * busy).div_ceil(rate.max(1))
                };
                cycles * period + into
            }
        };
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// Runs the guest from `from_ns` to `to_ns`: performs exactly the writes
    /// due in that interval, each stamping a page of the working set in
    /// `ram` and marking it in `log`. Returns the number of writes.
    pub fn advance(
        &mut self,
        ram: &mut SimRam,
        log: &mut SimDirtyLog,
        from_ns: u64,
        to_ns: u64,
    ) -> Result<u64, WorkloadError> {
        Ok(self
            .advance_until_fault(ram, log, from_ns, to_ns, |_, _| true)?
            .writes)
    }

    /// Like [`advance`](Self::advance), for a guest running on a postcopy
    /// destination: before each write, `present(block, page)` says whether
    /// the page has arrived. The first write to a missing page is not
    /// performed: the guest blocks for the rest of the interval and the
    /// fault is returned, for the harness to turn into a page request. The
    /// next call retries the same page first, at its start, and the rate
    /// resumes from there (time blocked produces no writes, as for a real
    /// vCPU stuck in a userfaultfd fault).
    pub fn advance_until_fault(
        &mut self,
        ram: &mut SimRam,
        log: &mut SimDirtyLog,
        from_ns: u64,
        to_ns: u64,
        mut present: impl FnMut(usize, u64) -> bool,
    ) -> Result<Advance, WorkloadError> {
        if to_ns < from_ns {
            return Err(WorkloadError::BackwardsInterval { from_ns, to_ns });
        }
        let start = self.ran_ns;
        let end = start.saturating_add(to_ns - from_ns);
        let target = self.due(end);
        let mut writes = 0;
        while self.writes < target {
            let page = match self.blocked_on.take() {
                Some(p) => p,
                None => self.set.first_page + self.rng.u64(..self.set.pages),
            };
            let generation = self.writes + 1;
            if !present(self.set.block, page) {
                self.blocked_on = Some(page);
                // Blocked from the moment the write was due until the end.
                self.ran_ns = self.due_at(generation).clamp(start, end);
                let at_ns = from_ns + (self.ran_ns - start);
                let fault = Fault {
                    block: self.set.block,
                    page,
                    at_ns,
                };
                return Ok(Advance {
                    writes,
                    fault: Some(fault),
                });
            }
            self.stamp(ram, log, page)?;
            writes += 1;
        }
        self.ran_ns = end;
        Ok(Advance {
            writes,
            fault: None,
        })
    }

    /// Performs the next `n` writes at once, whatever the time: replays on
    /// another memory what this guest did elsewhere (the write sequence
    /// depends only on the seed and the count, not on when writes happen or
    /// how long the guest was blocked).
    pub fn replay_writes(
        &mut self,
        ram: &mut SimRam,
        log: &mut SimDirtyLog,
        n: u64,
    ) -> Result<(), WorkloadError> {
        for _ in 0..n {
            let page = match self.blocked_on.take() {
                Some(p) => p,
                None => self.set.first_page + self.rng.u64(..self.set.pages),
            };
            self.stamp(ram, log, page)?;
        }
        Ok(())
    }

    /// Writes the next generation's stamp into `page`.
    fn stamp(
        &mut self,
        ram: &mut SimRam,
        log: &mut SimDirtyLog,
        page: u64,
    ) -> Result<(), WorkloadError> {
        let generation = self.writes + 1;
        let mut stamp = [0u8; 16];
        stamp[..8].copy_from_slice(&page.to_le_bytes());
        stamp[8..].copy_from_slice(&generation.to_le_bytes());
        ram.write(self.set.block, page, 0, &stamp)?;
        // Words of the page past the stamp where the seed-derived word may
        // go; page_size >= 64 (a SimRam rule) so there are at least 5.
        let slots = ((self.page_size - 24) / 8) as u64;
        let noise = splitmix(self.seed ^ generation.rotate_left(32));
        let at = 24 + 8 * (splitmix(self.seed ^ page) % slots) as usize;
        ram.write(self.set.block, page, at, &noise.to_le_bytes())?;
        log.mark(self.set.block, page)?;
        self.writes = generation;
        Ok(())
    }
}

/// splitmix64's finaliser: turns a counter into well-spread bits.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `pages` pages of `ram`, spread evenly over all blocks, with
/// seed-derived nonzero data, and marks them in `log` (they are guest
/// writes). The same arguments always produce the same memory. Returns the
/// number of pages filled.
pub fn fill(
    ram: &mut SimRam,
    log: &mut SimDirtyLog,
    pages: u64,
    seed: u64,
) -> Result<u64, WorkloadError> {
    let total = ram.total_pages();
    if pages > total {
        return Err(WorkloadError::TooManyPages {
            requested: pages,
            total,
        });
    }
    let layout: Vec<(u64, usize)> = ram
        .blocks()
        .iter()
        .map(|b| (b.pages, b.page_size))
        .collect();
    let mut buf = Vec::new();
    let (mut block, mut block_start) = (0usize, 0u64);
    for k in 0..pages {
        // Evenly spaced, strictly increasing global page numbers (< total).
        let global = (u128::from(k) * u128::from(total) / u128::from(pages)) as u64;
        while let Some(&(n, _)) = layout
            .get(block)
            .filter(|&&(n, _)| global >= block_start + n)
        {
            block_start += n;
            block += 1;
        }
        let Some(&(_, page_size)) = layout.get(block) else {
            break;
        };
        let page = global - block_start;
        buf.resize(page_size, 0);
        fastrand::Rng::with_seed(splitmix(seed ^ splitmix(global))).fill(&mut buf);
        buf[0] |= 1; // never all zero
        ram.write_page(block, page, &buf)?;
        log.mark(block, page)?;
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::BlockSpec;

    fn world(pages: u64) -> (SimRam, SimDirtyLog) {
        let ram = SimRam::new(vec![
            BlockSpec::new("ram", pages, 4096),
            BlockSpec::new("b", 10, 4096),
        ])
        .unwrap();
        let log = SimDirtyLog::new_initially_clear(ram.blocks());
        (ram, log)
    }

    const SET: WorkingSet = WorkingSet {
        block: 0,
        first_page: 100,
        pages: 50,
    };

    #[test]
    fn a_burst_writes_fast_then_slow_and_each_write_is_due_when_counted() {
        let (ram, _) = world(1000);
        let burst = Burst {
            period_ns: 100_000_000,
            busy_ns: 20_000_000,
            busy_rate_pages_per_sec: 10_000,
        };
        let w = Workload::new(&ram, SET, 100, 1)
            .unwrap()
            .with_burst(burst)
            .unwrap();
        // 200 writes in the busy 20 ms, 8 in the quiet 80 ms.
        assert_eq!(w.due(20_000_000), 200);
        assert_eq!(w.due(100_000_000), 208);
        assert_eq!(w.due(120_000_000), 408);
        for k in 1..1000 {
            let t = w.due_at(k);
            assert!(w.due(t) >= k && w.due(t - 1) < k, "write {k} at {t} ns");
        }
        for bad in [
            Burst {
                period_ns: 0,
                ..burst
            },
            Burst {
                busy_ns: burst.period_ns + 1,
                ..burst
            },
            Burst {
                busy_rate_pages_per_sec: 0,
                ..burst
            },
        ] {
            let e = Workload::new(&ram, SET, 100, 1)
                .unwrap()
                .with_burst(bad)
                .unwrap_err();
            assert_eq!(e, WorkloadError::BadBurst(bad));
        }
    }

    #[test]
    fn long_run_rate_is_exact_whatever_the_intervals() {
        let (mut ram, mut log) = world(1000);
        let mut w = Workload::new(&ram, SET, 3, 1).unwrap();
        // 3 pages/s in steps of 0.1 s: most steps write nothing.
        let mut t = 0;
        let mut per_step = Vec::new();
        for _ in 0..100 {
            per_step.push(w.advance(&mut ram, &mut log, t, t + 100_000_000).unwrap());
            t += 100_000_000;
        }
        assert_eq!(w.writes(), 30);
        assert_eq!(per_step.iter().sum::<u64>(), 30);
        assert!(per_step.iter().all(|&n| n <= 1));
        // A gap (vCPUs stopped) is simply not advanced over.
        assert_eq!(
            w.advance(&mut ram, &mut log, 20_000_000_000, 21_000_000_000)
                .unwrap(),
            3
        );
    }

    #[test]
    fn writes_stay_in_the_set_and_are_stamped_and_logged() {
        let (mut ram, mut log) = world(1000);
        let mut w = Workload::new(&ram, SET, 10_000, 7).unwrap();
        assert_eq!(w.advance(&mut ram, &mut log, 0, 100_000_000).unwrap(), 1000);
        let mut newest = 0;
        for p in 0..1000 {
            let dirty = log.is_dirty(0, p).unwrap();
            assert_eq!(dirty, !ram.is_zero(0, p).unwrap(), "page {p}");
            assert_eq!(dirty, (100..150).contains(&p), "page {p}");
            if let Some(s) = Stamp::read(ram.page(0, p).unwrap()) {
                assert_eq!(s.page, p);
                newest = newest.max(s.generation);
            }
        }
        assert_eq!(newest, 1000);
        assert!(
            log.dirty_pages(0).unwrap() > 40,
            "1000 writes cover most of 50 pages"
        );
        assert_eq!(log.dirty_pages(1).unwrap(), 0);
    }

    #[test]
    fn same_seed_same_memory_other_seed_other_memory() {
        let run = |seed| {
            let (mut ram, mut log) = world(1000);
            let mut w = Workload::new(&ram, SET, 5_000, seed).unwrap();
            w.advance(&mut ram, &mut log, 0, 1_000_000_000).unwrap();
            ram.digest()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn pages_are_not_identical_beyond_the_stamp() {
        let (mut ram, mut log) = world(1000);
        let mut w = Workload::new(
            &ram,
            WorkingSet {
                block: 0,
                first_page: 0,
                pages: 2,
            },
            1000,
            3,
        )
        .unwrap();
        w.advance(&mut ram, &mut log, 0, 1_000_000_000).unwrap();
        let (a, b) = (ram.page(0, 0).unwrap(), ram.page(0, 1).unwrap());
        assert_ne!(a[16..], b[16..]);
    }

    #[test]
    fn bad_sets_and_intervals_are_typed_errors() {
        let (mut ram, mut log) = world(1000);
        for set in [
            WorkingSet {
                block: 0,
                first_page: 990,
                pages: 11,
            },
            WorkingSet {
                block: 0,
                first_page: 0,
                pages: 0,
            },
            WorkingSet {
                block: 2,
                first_page: 0,
                pages: 1,
            },
            WorkingSet {
                block: 0,
                first_page: u64::MAX,
                pages: 2,
            },
        ] {
            let e = Workload::new(&ram, set, 1, 0).unwrap_err();
            assert!(matches!(e, WorkloadError::BadWorkingSet { .. }), "{e}");
        }
        let mut w = Workload::new(&ram, SET, 1, 0).unwrap();
        assert_eq!(
            w.advance(&mut ram, &mut log, 5, 4),
            Err(WorkloadError::BackwardsInterval {
                from_ns: 5,
                to_ns: 4
            })
        );
        // A log for another layout is reported, not a panic.
        let mut small = SimDirtyLog::new(&[BlockSpec::new("x", 1, 4096)]);
        let e = w
            .advance(&mut ram, &mut small, 0, 1_000_000_000)
            .unwrap_err();
        assert!(matches!(e, WorkloadError::DirtyLog(_)), "{e}");
    }

    #[test]
    fn missing_page_blocks_the_guest_until_it_arrives() {
        let (mut ram, mut log) = world(1000);
        let mut w = Workload::new(&ram, SET, 10, 4).unwrap();
        let mut arrived = std::collections::HashSet::new();
        // Nothing has arrived: the first write, due at 100 ms, faults.
        let a = w
            .advance_until_fault(&mut ram, &mut log, 5_000, 1_000_005_000, |_, p| {
                arrived.contains(&p)
            })
            .unwrap();
        let fault = a.fault.unwrap();
        assert_eq!((a.writes, fault.block, fault.at_ns), (0, 0, 100_005_000));
        assert!((100..150).contains(&fault.page));
        assert_eq!(ram.present_pages(), 0);
        // Still missing: faults again at once, same page.
        let again = w
            .advance_until_fault(&mut ram, &mut log, 2_000_000_000, 2_000_000_001, |_, p| {
                arrived.contains(&p)
            })
            .unwrap();
        assert_eq!(
            again.fault,
            Some(Fault {
                at_ns: 2_000_000_000,
                ..fault
            })
        );
        // The page arrives (and, for simplicity, every other one): the
        // retried write goes first and the rate resumes from the fault.
        arrived.extend(100..150);
        let b = w
            .advance_until_fault(&mut ram, &mut log, 3_000_000_000, 4_000_000_000, |_, p| {
                arrived.contains(&p)
            })
            .unwrap();
        assert_eq!(
            b,
            Advance {
                writes: 11,
                fault: None
            }
        );
        let retried = Stamp::read(ram.page(0, fault.page).unwrap()).unwrap();
        assert_eq!(retried.page, fault.page);
        // 0.1 s run before the fault + 1 s after: 11 writes; the 2.9 s spent
        // blocked or stopped wrote nothing.
        assert_eq!(w.writes(), 11);
    }

    #[test]
    fn faults_only_on_missing_pages() {
        let (mut ram, mut log) = world(1000);
        let mut w = Workload::new(&ram, SET, 100_000, 8).unwrap();
        let a = w
            .advance_until_fault(&mut ram, &mut log, 0, 1_000_000_000, |b, p| {
                b == 0 && p != 120
            })
            .unwrap();
        let fault = a.fault.unwrap();
        assert_eq!(fault.page, 120);
        assert!(a.writes > 0 && a.writes == w.writes());
        assert!(ram.is_zero(0, 120).unwrap());
        // The fault happens when the next write is due: one per 10 us.
        assert_eq!(fault.at_ns, (a.writes + 1) * 10_000);
    }

    #[test]
    fn stamp_reads_only_stamped_pages() {
        assert_eq!(Stamp::read(&[0; 4096]), None);
        assert_eq!(Stamp::read(&[1; 15]), None);
        let mut p = [0u8; 16];
        p[8] = 2;
        p[0] = 9;
        assert_eq!(
            Stamp::read(&p),
            Some(Stamp {
                page: 9,
                generation: 2
            })
        );
    }

    #[test]
    fn fill_is_deterministic_spread_and_logged() {
        let (mut a, mut la) = world(1000);
        let (mut b, mut lb) = world(1000);
        assert_eq!(fill(&mut a, &mut la, 101, 9).unwrap(), 101);
        fill(&mut b, &mut lb, 101, 9).unwrap();
        assert_eq!(a.diff(&b), None);
        assert_eq!(a.present_pages(), 101);
        assert_eq!(la.total_dirty_pages(), 101);
        assert!(
            !a.is_zero(0, 0).unwrap() && !a.is_zero(1, 0).unwrap(),
            "spread over blocks"
        );
        let (mut c, mut lc) = world(1000);
        fill(&mut c, &mut lc, 101, 10).unwrap();
        assert_ne!(a.digest(), c.digest());
        fill(&mut c, &mut lc, 1010, 1).unwrap();
        assert_eq!(c.present_pages(), 1010);
        assert_eq!(
            fill(&mut c, &mut lc, 1011, 1),
            Err(WorkloadError::TooManyPages {
                requested: 1011,
                total: 1010
            })
        );
    }

    mod props {
        use super::*;
        use crate::memory::BlockSpec;
        use proptest::prelude::*;

        proptest! {
            /// Splitting the running time into any intervals gives exactly
            /// the writes and memory of one long interval.
            #[test]
            fn interval_split_does_not_matter(
                rate in 0..5_000u64,
                seed in any::<u64>(),
                mut cuts in proptest::collection::vec(0..100_000_000u64, 0..20),
            ) {
                let spec = vec![BlockSpec::new("m", 256, 64)];
                let set = WorkingSet { block: 0, first_page: 10, pages: 200 };
                let run = |points: &[u64]| {
                    let mut ram = SimRam::new(spec.clone()).unwrap();
                    let mut log = SimDirtyLog::new_initially_clear(&spec);
                    let mut w = Workload::new(&ram, set, rate, seed).unwrap();
                    for pair in points.windows(2) {
                        w.advance(&mut ram, &mut log, pair[0], pair[1]).unwrap();
                    }
                    (w.writes(), ram.digest(), log.total_dirty_pages())
                };
                cuts.push(0);
                cuts.push(100_000_000);
                cuts.sort_unstable();
                let split = run(&cuts);
                let whole = run(&[0, 100_000_000]);
                prop_assert_eq!(split, whole);
                prop_assert_eq!(whole.0, rate / 10);
            }
        }
    }
}
