//! The books of postcopy faults: which faulted pages are waiting for their
//! data and who waits for them, how long each request took (fault to
//! placement) and how long each faulting thread was blocked in all.
//!
//! One set of books, heap-free: the waits are a fixed table (a thread waits
//! for one page at a time, so [`MAX_WAITS`] covers any realistic number of
//! vCPUs, and the source refuses more than its own request queue anyway),
//! and the latency samples live in storage the caller provides, one `u64`
//! per page at most, since a page is requested at most once per
//! migration. The KVM shim's userfaultfd layer keeps them for its fault
//! thread, which must answer a refault without the engine.

use core::time::Duration;

use crate::stats::nearest_rank;
use crate::time::Instant;

/// Outstanding (page, thread) waits the books can hold.
pub const MAX_WAITS: usize = 256;

/// Distinct faulting threads whose blocktime the books keep.
pub const MAX_WAITERS: usize = 256;

/// Why the books could not take a fault or a placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultBooksError {
    /// More than [`MAX_WAITS`] (page, thread) waits at once.
    TooManyWaits,
    /// More than [`MAX_WAITERS`] distinct faulting threads.
    TooManyWaiters,
    /// The latency storage is full (give it one word per page).
    SamplesFull {
        /// Words of storage given.
        capacity: usize,
    },
}

impl core::fmt::Display for FaultBooksError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FaultBooksError::TooManyWaits => {
                write!(f, "more than {MAX_WAITS} page faults waiting at once")
            }
            FaultBooksError::TooManyWaiters => {
                write!(f, "more than {MAX_WAITERS} faulting threads")
            }
            FaultBooksError::SamplesFull { capacity } => write!(
                f,
                "more than {capacity} fault latency samples (one per page is enough)"
            ),
        }
    }
}

impl core::error::Error for FaultBooksError {}

#[derive(Clone, Copy, Debug)]
struct Wait {
    page: u64,
    waiter: u32,
    since: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Request {
    page: u64,
    at: Instant,
}

/// Postcopy fault books over latency storage `S` (a slice, an array, a
/// `Vec`: anything that is a `[u64]`).
#[derive(Debug)]
pub struct FaultBooks<S> {
    requests: heapless::Vec<Request, MAX_WAITS>,
    waits: heapless::Vec<Wait, MAX_WAITS>,
    blocked: heapless::Vec<(u32, Duration), MAX_WAITERS>,
    samples: S,
    len: usize,
    sorted: bool,
    duplicates: u64,
}

impl<S: AsRef<[u64]> + AsMut<[u64]>> FaultBooks<S> {
    /// Empty books keeping up to `samples.len()` request latencies.
    pub fn new(samples: S) -> Self {
        FaultBooks {
            requests: heapless::Vec::new(),
            waits: heapless::Vec::new(),
            blocked: heapless::Vec::new(),
            samples,
            len: 0,
            sorted: true,
            duplicates: 0,
        }
    }

    /// Thread `waiter` faulted on `page` at `at`. True when the page was
    /// not waited for yet: the caller requests it; false for a second
    /// thread on the same page, or the same thread faulting again
    /// (counted as a duplicate).
    pub fn fault(&mut self, page: u64, waiter: u32, at: Instant) -> Result<bool, FaultBooksError> {
        let first = !self.requests.iter().any(|r| r.page == page);
        if !first {
            self.duplicates += 1;
        }
        if !self
            .waits
            .iter()
            .any(|w| w.page == page && w.waiter == waiter)
        {
            self.waits
                .push(Wait {
                    page,
                    waiter,
                    since: at,
                })
                .map_err(|_| FaultBooksError::TooManyWaits)?;
        }
        if first {
            self.requests
                .push(Request { page, at })
                .map_err(|_| FaultBooksError::TooManyWaits)?;
        }
        Ok(first)
    }

    /// Pages `first .. first + count` are in place as of `at`: their
    /// requests are answered (one latency sample each, from the first
    /// fault) and their waiters' blocked time is added up.
    pub fn placed(&mut self, first: u64, count: u64, at: Instant) -> Result<(), FaultBooksError> {
        if self.requests.is_empty() {
            return Ok(());
        }
        let end = first.saturating_add(count);
        let within = |page: u64| page >= first && page < end;
        let mut i = 0;
        while let Some(w) = self.waits.get(i).copied() {
            if !within(w.page) {
                i += 1;
                continue;
            }
            self.waits.swap_remove(i);
            let waited = at.saturating_since(w.since);
            match self.blocked.iter_mut().find(|(t, _)| *t == w.waiter) {
                Some((_, total)) => *total += waited,
                None => self
                    .blocked
                    .push((w.waiter, waited))
                    .map_err(|_| FaultBooksError::TooManyWaiters)?,
            }
        }
        let mut i = 0;
        while let Some(r) = self.requests.get(i).copied() {
            if !within(r.page) {
                i += 1;
                continue;
            }
            self.requests.swap_remove(i);
            let capacity = self.samples.as_ref().len();
            let slot = self
                .samples
                .as_mut()
                .get_mut(self.len)
                .ok_or(FaultBooksError::SamplesFull { capacity })?;
            *slot = at.saturating_since(r.at).as_nanos() as u64;
            self.len += 1;
            self.sorted = false;
        }
        Ok(())
    }

    /// Whether `page` is waited for.
    pub fn is_waited_for(&self, page: u64) -> bool {
        self.requests.iter().any(|r| r.page == page)
    }

    /// Requested pages not yet placed.
    pub fn outstanding(&self) -> usize {
        self.requests.len()
    }

    /// Faults on a page already waited for.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Answered requests, each a latency sample.
    pub fn samples(&self) -> usize {
        self.len
    }

    /// The `pct`-th percentile of the request latencies (first fault to
    /// placement), by [`nearest_rank`]. Sorts the samples in place.
    pub fn latency_percentile(&mut self, pct: u8) -> Option<Duration> {
        let samples = self.samples.as_mut().get_mut(..self.len)?;
        if !self.sorted {
            samples.sort_unstable();
            self.sorted = true;
        }
        nearest_rank(samples, pct).map(Duration::from_nanos)
    }

    /// Every latency sample kept, in nanoseconds, in no particular order
    /// (a percentile sorts them): a host that pools the requests of many
    /// migrations (a benchmark's rounds) needs the samples, since medians
    /// of a few requests each do not add up to the median of all of them.
    pub fn latencies_ns(&self) -> &[u64] {
        self.samples.as_ref().get(..self.len).unwrap_or_default()
    }

    /// Total time each faulting thread waited, by thread, in the order
    /// they first waited.
    pub fn blocktime(&self) -> &[(u32, Duration)] {
        &self.blocked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Instant {
        Instant::from_millis(n)
    }

    #[test]
    fn a_page_is_requested_once_and_every_waiter_is_timed() {
        let mut books = FaultBooks::new([0u64; 4]);
        assert_eq!(books.fault(7, 1, ms(10)), Ok(true));
        assert_eq!(books.fault(7, 2, ms(12)), Ok(false));
        // The same thread refaulting is not a new waiter.
        assert_eq!(books.fault(7, 1, ms(13)), Ok(false));
        assert_eq!(books.duplicates(), 2);
        assert!(books.is_waited_for(7));
        assert_eq!(books.outstanding(), 1);
        // A placement elsewhere answers nothing.
        books.placed(0, 7, ms(14)).unwrap();
        assert_eq!(books.outstanding(), 1);
        books.placed(6, 2, ms(20)).unwrap();
        assert_eq!(books.outstanding(), 0);
        assert_eq!(books.samples(), 1);
        assert_eq!(
            books.latency_percentile(50),
            Some(Duration::from_millis(10))
        );
        assert_eq!(
            books.blocktime(),
            &[
                (1, Duration::from_millis(10)),
                (2, Duration::from_millis(8))
            ]
        );
    }

    #[test]
    fn latencies_are_nearest_rank_and_storage_is_bounded() {
        let mut books = FaultBooks::new([0u64; 3]);
        for (page, wait) in [(1, 30), (2, 10), (3, 20)] {
            books.fault(page, 1, ms(0)).unwrap();
            books.placed(page, 1, ms(wait)).unwrap();
        }
        assert_eq!(
            books.latency_percentile(50),
            Some(Duration::from_millis(20))
        );
        assert_eq!(
            books.latency_percentile(99),
            Some(Duration::from_millis(30))
        );
        books.fault(4, 1, ms(0)).unwrap();
        assert_eq!(
            books.placed(4, 1, ms(5)),
            Err(FaultBooksError::SamplesFull { capacity: 3 })
        );
        let mut empty = FaultBooks::new([0u64; 0]);
        assert_eq!(empty.latency_percentile(50), None);
        assert!(empty.latencies_ns().is_empty());
        let mut kept = books.latencies_ns().to_vec();
        kept.sort_unstable();
        assert_eq!(kept, [10_000_000, 20_000_000, 30_000_000]);
    }

    #[test]
    fn more_waits_than_the_table_holds_is_an_error() {
        let mut books = FaultBooks::new([0u64; 1]);
        for page in 0..MAX_WAITS as u64 {
            books.fault(page, 1, ms(0)).unwrap();
        }
        assert_eq!(
            books.fault(MAX_WAITS as u64, 1, ms(0)),
            Err(FaultBooksError::TooManyWaits)
        );
    }
}
