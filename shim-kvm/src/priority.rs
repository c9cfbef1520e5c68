//! Threads ahead of the host's others for the few milliseconds of a stop.
//!
//! Every microsecond between the source's vCPU stop and the destination's
//! confirmation is downtime, and in it the threads that matter do little
//! but wake: the vCPU threads to leave `KVM_RUN` and park, the migration
//! thread for each of them, then for the destination's LOADED and its
//! confirmation, the return-path reader for each message. On a busy host
//! each wake-up waits for a CPU behind whatever runs there (other guests,
//! builds; on one host, as in `livemig bench`, the destination's own
//! vCPUs, started just before its confirmation): up to a time slice, about
//! a millisecond, per wake-up in traces taken on the 2-core development
//! VM. A lower nice value for the stop lets those threads run as soon as
//! they wake; it is put back when the guest runs again (for vCPU threads,
//! once they are parked), so nothing is held back after.

use std::io;

/// Threads whose nice value was lowered; dropping it puts back what each
/// had.
#[derive(Debug, Default)]
pub struct Raised {
    /// Kernel thread id and its nice value before.
    threads: Vec<(i32, i32)>,
}

impl Raised {
    /// Sets `nice` on every thread of `tids` (kernel thread ids; 0 is
    /// skipped: a thread that has not said who it is yet). Returns what was
    /// raised and the first refusal: lowering a nice value needs
    /// `CAP_SYS_NICE` (or an `RLIMIT_NICE` that allows it), and without it
    /// the threads keep theirs, the migration going on as it would have.
    pub fn raise(tids: &[i32], nice: i8) -> (Raised, Option<io::Error>) {
        let mut raised = Raised::default();
        let mut refused = None;
        for &tid in tids.iter().filter(|&&t| t > 0) {
            let result = nice_of(tid).and_then(|before| {
                set_nice(tid, i32::from(nice))?;
                Ok(before)
            });
            match result {
                Ok(before) => raised.threads.push((tid, before)),
                Err(e) => {
                    refused.get_or_insert(e);
                }
            }
        }
        (raised, refused)
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        for &(tid, before) in &self.threads {
            // Raising one's nice value needs no privilege; a thread that
            // has ended meanwhile has nothing to restore.
            let _ = set_nice(tid, before);
        }
    }
}

/// The calling thread's kernel thread id.
pub fn current_tid() -> i32 {
    // SAFETY: gettid(2) takes no argument, touches no memory and cannot
    // fail.
    unsafe { libc::gettid() }
}

/// The nice value of thread `tid`.
fn nice_of(tid: i32) -> io::Result<i32> {
    let who = libc::id_t::try_from(tid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // getpriority(2) may return -1 as a value: errno tells a failure.
    // SAFETY: __errno_location returns this thread's errno, valid for the
    // thread's life; getpriority only reads its arguments.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, who)
    };
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(0) | None => Ok(nice),
        Some(_) => Err(error),
    }
}

/// Sets thread `tid`'s nice value (on Linux `PRIO_PROCESS` with a thread
/// id names that one thread).
fn set_nice(tid: i32, nice: i32) -> io::Result<()> {
    let who = libc::id_t::try_from(tid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: setpriority(2) only reads its integer arguments.
    match unsafe { libc::setpriority(libc::PRIO_PROCESS, who, nice) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raise_is_undone_when_dropped() {
        let tid = current_tid();
        let before = nice_of(tid).unwrap();
        let (raised, refused) = Raised::raise(&[tid], -5);
        match refused {
            // Without CAP_SYS_NICE nothing changed.
            Some(_) => assert_eq!(nice_of(tid).unwrap(), before),
            None => assert_eq!(nice_of(tid).unwrap(), -5),
        }
        drop(raised);
        assert_eq!(nice_of(tid).unwrap(), before);
    }

    #[test]
    fn threads_not_yet_known_are_skipped() {
        let (raised, refused) = Raised::raise(&[0], -5);
        assert!(raised.threads.is_empty());
        assert!(refused.is_none());
    }
}
