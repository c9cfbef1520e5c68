//! Ctrl-C (SIGINT) and SIGTERM as a request to cancel the migration.
//!
//! The handler only records the signal (the one thing a signal handler may
//! safely do); a watcher thread turns it into a [`Cancel`] request, which
//! the tool passes on to the migration's handle
//! ([`livemig_kvm::MigrationHandle::cancel`], which shuts the connection
//! down so that even a write blocked on a stuck peer returns, or
//! [`livemig_kvm::ReceiveHandle::interrupt`], which stops the load and
//! tells the source). The handles keep a [`Cancel`] of their own too. Later signals are caught too: once the
//! handlers are installed no signal kills the process, so a refused cancel
//! (after the postcopy switchover) changes nothing. That matters most
//! while a postcopy is paused by a cut connection: each process then holds
//! part of the guest (the destination runs it, the source has the pages
//! not yet received), so neither may end before the recovery or its
//! deadline; the tool says so on stderr when it refuses the signal, and
//! only SIGKILL, which cannot be caught, ends it (and loses the guest).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The first signal caught, 0 before any.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only the first one is kept: it is the one the operator is told about.
    let _ = SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    notify_decision(sig);
}

/// The write end of the [`Hold`] pipe, -1 before a hold: every signal
/// caught is written there as one byte, which wakes the waiting thread.
static DECISION_FD: AtomicI32 = AtomicI32::new(-1);

/// SIGUSR1's handler: only a [`Hold`] listens for it.
extern "C" fn on_decision_signal(sig: libc::c_int) {
    notify_decision(sig);
}

/// Writes `sig` to the hold pipe, if there is one (async-signal-safe: an
/// atomic load and `write`, with `errno` kept for the code interrupted).
fn notify_decision(sig: libc::c_int) {
    let fd = DECISION_FD.load(Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    // Signal numbers fit in a byte on Linux (at most 64).
    let byte = sig as u8;
    // SAFETY: `__errno_location` returns this thread's errno, valid for the
    // thread's life; `write` of one byte from a live stack variable to a
    // pipe that is never closed (see `hold_pipe`) is async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let _ = libc::write(fd, (&raw const byte).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

/// What [`Cancel`] holds before a request.
const NOT_CANCELLED: i32 = 0;
/// What [`Cancel`] holds after [`Cancel::cancel`] (no signal).
const CANCELLED: i32 = -1;

/// A cancellation request shared between the migration thread and whoever
/// may cancel it (another thread, a signal watcher).
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicI32>);

impl Cancel {
    /// A request not yet made.
    pub fn new() -> Self {
        Cancel::default()
    }

    /// Asks the migration to stop; the guest keeps running on the source.
    pub fn cancel(&self) {
        self.request(CANCELLED);
    }

    /// Asks the migration to stop on behalf of `signal` (a positive
    /// signal number), which [`Cancel::signal`] then names; any other
    /// number is a plain [`Cancel::cancel`].
    pub fn interrupt(&self, signal: i32) {
        self.request(if signal > 0 { signal } else { CANCELLED });
    }

    /// The first request wins, so the signal named is the one that came.
    fn request(&self, how: i32) {
        let _ = self
            .0
            .compare_exchange(NOT_CANCELLED, how, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Whether a cancel was asked for (by [`Cancel::cancel`] or a signal).
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) != NOT_CANCELLED
    }

    /// The signal that asked for the cancel, if a signal did.
    pub fn signal(&self) -> Option<i32> {
        Some(self.0.load(Ordering::SeqCst)).filter(|&s| s > 0)
    }
}

/// Routes SIGINT and SIGTERM to `cancel` for the rest of the process's
/// life: the first such signal cancels the migration instead of killing
/// the process (which would leave the guest nowhere).
pub fn cancel_on_signals(cancel: &Cancel) -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let handler: extern "C" fn(libc::c_int) = on_signal;
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; `signal` replaces no handler this process relies on.
        let old = unsafe { libc::signal(sig, handler as libc::sighandler_t) };
        if old == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
    }
    let cancel = cancel.clone();
    std::thread::Builder::new()
        .name("livemig-signals".into())
        .spawn(move || {
            let sig = loop {
                match SIGNAL.load(Ordering::SeqCst) {
                    0 => std::thread::sleep(Duration::from_millis(20)),
                    sig => break sig,
                }
            };
            cancel.request(sig);
        })?;
    Ok(())
}

/// What the operator decided about a guest held paused after an ambiguous
/// end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// SIGUSR1: run the guest on this host.
    Run,
    /// SIGTERM or SIGINT (the signal): discard this copy of the guest.
    Discard(i32),
    /// No signal within the hold timeout: this copy is discarded.
    TimedOut,
}

/// The read end of the process's hold pipe, made once and kept for the
/// process's life, so that a signal handler never writes to a closed (or
/// reused) descriptor.
fn hold_pipe() -> std::io::Result<&'static OwnedFd> {
    static PIPE: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = PIPE.get() {
        return Ok(fd);
    }
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a valid array of two ints for `pipe2` to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `pipe2` succeeded, so `fds[0]` is an open descriptor owned
    // by nobody else. The write end stays open (and unowned) for ever.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    DECISION_FD.store(fds[1], Ordering::SeqCst);
    Ok(PIPE.get_or_init(|| read))
}

/// A guest held paused until the operator decides: once made, SIGUSR1
/// (run it here), SIGTERM and SIGINT (discard it) are caught and only
/// recorded for [`Hold::wait`]; no signal kills the process meanwhile.
#[derive(Debug)]
pub struct Hold {
    read: &'static OwnedFd,
}

impl Hold {
    /// Installs the handlers. Make the hold before telling the operator
    /// which signals decide, so that none of them comes too early.
    pub fn new() -> std::io::Result<Hold> {
        let read = hold_pipe()?;
        install(libc::SIGUSR1, on_decision_signal)?;
        for sig in [libc::SIGINT, libc::SIGTERM] {
            install(sig, on_signal)?;
        }
        Ok(Hold { read })
    }

    /// Blocks (in `poll`, no spinning) until a deciding signal comes or
    /// `timeout` passes. Signals caught before the first hold was made (a
    /// cancel during the migration) do not count: nothing was written then.
    pub fn wait(&self, timeout: Duration) -> std::io::Result<Decision> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut byte = 0u8;
            // SAFETY: reads at most one byte into a live stack variable
            // from a descriptor this process owns.
            let n = unsafe { libc::read(self.read.as_raw_fd(), (&raw mut byte).cast(), 1) };
            if n == 1 {
                match i32::from(byte) {
                    libc::SIGUSR1 => return Ok(Decision::Run),
                    sig @ (libc::SIGINT | libc::SIGTERM) => return Ok(Decision::Discard(sig)),
                    _ => continue,
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Decision::TimedOut);
            }
            let mut pfd = libc::pollfd {
                fd: self.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Rounded up, so that the wait never ends a little early.
            let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Sets `handler` for `sig`.
fn install(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) -> std::io::Result<()> {
    // SAFETY: the handlers only store to atomics and `write` to a pipe,
    // which is async-signal-safe; `signal` replaces no handler this process
    // relies on.
    let old = unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    if old == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_is_shared_by_clones() {
        let a = Cancel::new();
        let b = a.clone();
        assert!(!b.is_cancelled());
        a.cancel();
        assert!(b.is_cancelled());
        assert_eq!(b.signal(), None);
    }

    #[test]
    fn the_first_request_is_the_one_named() {
        let c = Cancel::new();
        c.request(libc::SIGTERM);
        c.request(libc::SIGINT);
        c.cancel();
        assert!(c.is_cancelled());
        assert_eq!(c.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn a_hold_is_decided_by_the_signal_or_the_timeout() {
        let hold = Hold::new().expect("hold");
        let start = Instant::now();
        assert_eq!(
            hold.wait(Duration::from_millis(50)).expect("wait"),
            Decision::TimedOut
        );
        assert!(start.elapsed() >= Duration::from_millis(50));
        // SAFETY: raising a signal whose handler was just installed.
        unsafe { libc::raise(libc::SIGUSR1) };
        assert_eq!(
            hold.wait(Duration::from_secs(5)).expect("wait"),
            Decision::Run
        );
        // SAFETY: as above.
        unsafe { libc::raise(libc::SIGTERM) };
        assert_eq!(
            hold.wait(Duration::from_secs(5)).expect("wait"),
            Decision::Discard(libc::SIGTERM)
        );
    }
}
