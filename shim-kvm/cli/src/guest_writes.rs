//! After a postcopy the destination's guest ran while its memory arrived,
//! so "destination memory equals the source's at the stop" can only be
//! checked on the pages that guest did not write. The destination logs
//! its guest's writes with KVM's dirty log from before the stream arrives
//! (livemig's own page loads are host writes, which KVM does not log); at
//! the end of its watch, with the guest paused, it digests every page
//! outside that log. The source, whose guest stays stopped after the
//! switchover, digests the same pages of its stop image: equal digests
//! mean every page the destination guest did not touch arrived as it was
//! at the stop. The pages it did write are checked by the guest itself
//! (each holds the stamp its vCPU's counter implies).

use std::fmt;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use livemig_kvm::dirty_log::{DirtyLogError, DirtyLogMode, DirtyLogging};
use livemig_kvm::memory::{GuestMemory, MemoryError, PAGE_SIZE};

/// Why the guest's writes could not be logged or the rest digested.
#[derive(Debug)]
pub enum WritesError {
    /// Turning the dirty log on or reading it failed.
    DirtyLog(DirtyLogError),
    /// Reading guest memory failed.
    Memory(MemoryError),
}

impl fmt::Display for WritesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WritesError::DirtyLog(e) => write!(f, "logging the destination guest's writes: {e}"),
            WritesError::Memory(e) => write!(f, "digesting the pages it did not write: {e}"),
        }
    }
}

impl std::error::Error for WritesError {}

/// KVM's log of the guest's writes on this host, from its start on.
pub struct WriteLog {
    log: DirtyLogging<Arc<VmFd>>,
}

impl fmt::Debug for WriteLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteLog").finish_non_exhaustive()
    }
}

impl WriteLog {
    /// Starts logging the guest's writes to `memory` (the VMM's memslots
    /// on `vm`). Get-and-clear mode: every page starts clean, so the first
    /// read says exactly what the guest wrote since now.
    pub fn start(vm: Arc<VmFd>, memory: GuestMemory) -> Result<WriteLog, WritesError> {
        DirtyLogging::start(vm, memory, DirtyLogMode::Legacy)
            .map(|log| WriteLog { log })
            .map_err(WritesError::DirtyLog)
    }

    /// Stops logging, for a migration that needs no log (it completed in
    /// precopy: the digest at load covers all of memory).
    pub fn stop(self) -> Result<(), WritesError> {
        self.log.stop().map_err(WritesError::DirtyLog)
    }

    /// With the guest paused: the runs of guest pages (first, count) it
    /// wrote since [`WriteLog::start`], and the digest of every other page.
    /// Logging stops.
    pub fn finish(self) -> Result<GuestWrites, WritesError> {
        let memory = self.log.memory().clone();
        let mut written = Vec::new();
        for (i, region) in memory.regions().iter().enumerate() {
            let mut words = vec![0u64; region.bitmap_words()];
            self.log.get(i, &mut words).map_err(WritesError::DirtyLog)?;
            let first = region.guest_phys() / PAGE_SIZE as u64;
            for page in 0..region.pages() {
                if words[(page / 64) as usize] & (1 << (page % 64)) != 0 {
                    written.push(first + page);
                }
            }
        }
        self.log.stop().map_err(WritesError::DirtyLog)?;
        let ranges = runs(&written);
        let digest = digest_outside(&memory, &ranges).map_err(WritesError::Memory)?;
        Ok(GuestWrites {
            pages: written.len() as u64,
            ranges,
            digest,
        })
    }
}

/// What the destination guest wrote, and the digest of the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestWrites {
    /// Pages written.
    pub pages: u64,
    /// Those pages as runs (first guest page, count), ascending.
    pub ranges: Vec<(u64, u64)>,
    /// [`digest_outside`] of the written runs.
    pub digest: u64,
}

/// Ascending page numbers as runs (first, count).
fn runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((first, count)) if *first + *count == p => *count += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// The [`GuestMemory::digest`] terms of every page of `memory` outside the
/// ascending runs `written`: what both hosts compute over the same pages.
pub fn digest_outside(memory: &GuestMemory, written: &[(u64, u64)]) -> Result<u64, MemoryError> {
    let page = PAGE_SIZE as u64;
    let mut next = written.iter().peekable();
    let outside = memory.regions().iter().flat_map(|r| {
        let first = r.guest_phys() / page;
        first..first + r.pages()
    });
    let pages: Vec<u64> = outside
        .filter(|&p| {
            while next.peek().is_some_and(|&&(f, c)| f + c <= p) {
                next.next();
            }
            next.peek().is_none_or(|&&(f, _)| f > p)
        })
        .collect();
    memory.digest_of(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_become_runs() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[3, 4, 5, 9, 11, 12]), vec![(3, 3), (9, 1), (11, 2)]);
    }
}
