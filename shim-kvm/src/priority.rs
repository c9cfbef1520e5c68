//! Threads ahead of the host's others for the few milliseconds of a stop.
//!
//! Every microsecond between the source's vCPU stop and the destination's
//! start is downtime, and in it the threads that matter do little but
//! wake: the vCPU threads to leave `KVM_RUN` and park, the migration
//! thread for each of them, the return-path reader for each message, and
//! on the destination its stream reader and migration thread for the last
//! records, the commit and the start. On a busy host each wake-up waits
//! for a CPU behind whatever runs there (other guests, builds; on one
//! host, as in `livemig bench`, the destination's own vCPUs, started just
//! before its confirmation).
//!
//! A lower nice value is not enough on a current kernel: EEVDF lets the
//! thread on a CPU run out its slice before a woken one of more weight
//! gets it, and with the 4 ms tick of this development VM's kernel a
//! nice -10 wake-up still waited up to 4 ms behind an ordinary thread
//! (`bench --case busy-1g`, the confirmation reaching the source's
//! migration thread 3-6 ms after the destination sent it in one run of
//! ten; with `SCHED_FIFO` never more than 0.2 ms in twenty, same load).
//! So the default is [`StopPriority::Realtime`]: the lowest real-time
//! priority, ahead of every ordinary thread and behind every real-time
//! one the host has, for the stop only. A host that refuses it (no
//! `CAP_SYS_NICE`, or an `RLIMIT_RTPRIO` of 0) gets the nice value
//! instead, and the refusal is reported. Both are put back when the guest
//! runs again (for vCPU threads, once they are parked), so nothing is held
//! back after, and nothing runs real-time while it could spin: the
//! threads raised only wait on sockets and channels in the stop.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

/// How the stop's threads are put ahead of the host's others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopPriority {
    /// `SCHED_FIFO` at priority 1, or where that is refused
    /// [`DEFAULT_STOP_NICE`].
    Realtime,
    /// This nice value (-20 to 19; lower runs first), the scheduling
    /// policy left as it is.
    Nice(i8),
}

/// The nice value of [`StopPriority::Realtime`]'s fallback: well ahead of
/// the host's ordinary threads (nice 0).
pub const DEFAULT_STOP_NICE: i8 = -10;

/// A thread's scheduling before a raise.
#[derive(Clone, Copy, Debug)]
struct Saved {
    tid: i32,
    nice: i32,
    /// Its policy and real-time priority, when the raise changed them.
    policy: Option<(i32, i32)>,
}

/// Threads raised for the stop; dropping it puts back what each had.
#[derive(Debug, Default)]
pub struct Raised {
    threads: Vec<Saved>,
}

impl Raised {
    /// Raises every thread of `tids` (kernel thread ids; 0 is skipped: a
    /// thread that has not said who it is yet) to `priority`. Returns what
    /// was raised and the first refusal: real-time scheduling and a lower
    /// nice value need `CAP_SYS_NICE` (or rlimits that allow them);
    /// refused, a thread keeps what it had (or gets the nice value, when
    /// only real-time was refused), the migration going on as it would
    /// have.
    pub fn raise(tids: &[i32], priority: StopPriority) -> (Raised, Option<io::Error>) {
        let mut raised = Raised::default();
        let mut refused = None;
        for &tid in tids.iter().filter(|&&t| t > 0) {
            let nice = match nice_of(tid) {
                Ok(nice) => nice,
                Err(e) => {
                    refused.get_or_insert(e);
                    continue;
                }
            };
            let mut saved = Saved {
                tid,
                nice,
                policy: None,
            };
            let fallback = match priority {
                StopPriority::Realtime => match policy_of(tid)
                    .and_then(|before| set_policy(tid, libc::SCHED_FIFO, 1).map(|()| before))
                {
                    Ok(before) => {
                        saved.policy = Some(before);
                        None
                    }
                    Err(e) => {
                        refused.get_or_insert(e);
                        Some(DEFAULT_STOP_NICE)
                    }
                },
                StopPriority::Nice(nice) => Some(nice),
            };
            if let Some(nice) = fallback
                && let Err(e) = set_nice(tid, i32::from(nice))
            {
                refused.get_or_insert(e);
            }
            raised.threads.push(saved);
        }
        (raised, refused)
    }
}

impl Raised {
    /// How many threads were raised (fully or to the fallback nice value).
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        for saved in &self.threads {
            // Leaving real-time and raising one's nice value need no
            // privilege; a thread that has ended meanwhile has nothing to
            // restore.
            if let Some((policy, priority)) = saved.policy {
                let _ = set_policy(saved.tid, policy, priority);
            }
            let _ = set_nice(saved.tid, saved.nice);
        }
    }
}

/// A migration thread and its connection's reader, raised together for
/// the stop: both hosts raise this pair (the source from its vCPU stop,
/// the destination from the source's SwitchoverStart) and put it back once
/// the guest runs again.
#[derive(Debug, Default)]
pub(crate) struct StopThreads {
    /// `None`: raise nothing (not asked for, or the stop is over).
    priority: Option<StopPriority>,
    /// The current reader's kernel thread id, stored by the reader once it
    /// runs (0 until then).
    reader_tid: Arc<AtomicI32>,
    /// Put back when dropped.
    raised: Option<Raised>,
    /// The first refusal's errno.
    refused: Option<i32>,
    /// Threads raised.
    count: usize,
}

impl StopThreads {
    /// The calling thread and the reader that stores its id in
    /// `reader_tid`, to raise to `priority` (neither when `None`).
    pub(crate) fn new(priority: Option<StopPriority>, reader_tid: Arc<AtomicI32>) -> StopThreads {
        StopThreads {
            priority,
            reader_tid,
            ..StopThreads::default()
        }
    }

    /// Where the reader stores its thread id.
    pub(crate) fn reader_tid(&self) -> &Arc<AtomicI32> {
        &self.reader_tid
    }

    /// A new connection's reader takes the old one's place.
    pub(crate) fn set_reader(&mut self, tid: Arc<AtomicI32>) {
        self.reader_tid = tid;
    }

    /// Raises the calling thread and the reader, once per stop.
    pub(crate) fn raise(&mut self) {
        let Some(priority) = self.priority else {
            return;
        };
        if self.raised.is_some() {
            return;
        }
        let tids = [current_tid(), self.reader_tid.load(Ordering::Acquire)];
        let (raised, refused) = Raised::raise(&tids, priority);
        self.count = raised.len();
        self.raised = Some(raised);
        if let Some(errno) = refused.and_then(|e| e.raw_os_error()) {
            self.refused.get_or_insert(errno);
        }
    }

    /// Raises `tids` (the vCPU threads while they park) for as long as the
    /// returned guard lives; a refusal is kept with this pair's.
    pub(crate) fn raise_also(&mut self, tids: &[i32]) -> Option<Raised> {
        let priority = self.priority?;
        let (raised, refused) = Raised::raise(tids, priority);
        if let Some(errno) = refused.and_then(|e| e.raw_os_error()) {
            self.refused.get_or_insert(errno);
        }
        Some(raised)
    }

    /// Puts the threads back and raises no more: the stop is over.
    pub(crate) fn end(&mut self) {
        self.raised = None;
        self.priority = None;
    }

    /// The errno of the first raise the host refused.
    pub(crate) fn refused(&self) -> Option<i32> {
        self.refused
    }

    /// How many threads the pair's raise covered.
    pub(crate) fn count(&self) -> usize {
        self.count
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

/// Thread `tid`'s scheduling policy and real-time priority.
fn policy_of(tid: i32) -> io::Result<(i32, i32)> {
    // SAFETY: sched_getscheduler(2) only reads its argument.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param the call writes into.
    match unsafe { libc::sched_getparam(tid, &mut param) } {
        0 => Ok((policy, param.sched_priority)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Sets thread `tid`'s scheduling policy and real-time priority (0 for
/// the ordinary policies).
fn set_policy(tid: i32, policy: i32, priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: sched_setscheduler(2) only reads `param`, a valid
    // sched_param that outlives the call.
    match unsafe { libc::sched_setscheduler(tid, policy, &param) } {
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
        let (raised, refused) = Raised::raise(&[tid], StopPriority::Nice(-5));
        match refused {
            // Without CAP_SYS_NICE nothing changed.
            Some(_) => assert_eq!(nice_of(tid).unwrap(), before),
            None => assert_eq!(nice_of(tid).unwrap(), -5),
        }
        drop(raised);
        assert_eq!(nice_of(tid).unwrap(), before);
    }

    #[test]
    fn a_realtime_raise_is_undone_when_dropped() {
        let tid = current_tid();
        let before = (policy_of(tid).unwrap(), nice_of(tid).unwrap());
        let (raised, refused) = Raised::raise(&[tid], StopPriority::Realtime);
        match refused {
            // Refused real-time, the thread has the fallback nice value
            // (or, refused that too, what it had).
            Some(_) => assert_eq!(policy_of(tid).unwrap(), before.0),
            None => assert_eq!(policy_of(tid).unwrap(), (libc::SCHED_FIFO, 1)),
        }
        drop(raised);
        assert_eq!((policy_of(tid).unwrap(), nice_of(tid).unwrap()), before);
    }

    #[test]
    fn threads_not_yet_known_are_skipped() {
        let (raised, refused) = Raised::raise(&[0], StopPriority::Realtime);
        assert!(raised.threads.is_empty());
        assert!(refused.is_none());
    }

    #[test]
    fn the_pair_is_raised_once_and_put_back_for_good_at_the_end() {
        let tid = current_tid();
        let before = nice_of(tid).unwrap();
        // The reader has not said who it is: only this thread is raised.
        let mut threads = StopThreads::new(Some(StopPriority::Nice(-3)), Arc::default());
        threads.raise();
        assert_eq!(threads.count(), 1);
        let raised_to = nice_of(tid).unwrap();
        if threads.refused().is_none() {
            assert_eq!(raised_to, -3);
        }
        // A second raise in the same stop changes nothing.
        threads.reader_tid().store(tid, Ordering::Release);
        threads.raise();
        assert_eq!(threads.count(), 1);
        threads.end();
        assert_eq!(nice_of(tid).unwrap(), before);
        // Over: nothing is raised again.
        threads.raise();
        assert_eq!(nice_of(tid).unwrap(), before);
        assert!(threads.raise_also(&[tid]).is_none());
    }

    #[test]
    fn nothing_is_raised_without_a_priority() {
        let tid = current_tid();
        let mut threads = StopThreads::new(None, Arc::new(AtomicI32::new(tid)));
        threads.raise();
        assert_eq!(threads.count(), 0);
        assert!(threads.raise_also(&[tid]).is_none());
        assert_eq!(threads.refused(), None);
    }
}
