//! Ctrl-C (SIGINT) and SIGTERM as a request to cancel the migration.
//!
//! The handler only records the signal (the one thing a signal handler may
//! safely do); a watcher thread turns it into a [`Cancel`] request, which
//! the source carries out by shutting the connection down (so that even a
//! write blocked on a stuck peer returns) and the destination by stopping
//! its load and telling the source. Later signals are caught too: once the
//! handlers are installed no signal kills the process, so a refused cancel
//! (after the postcopy switchover) changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// The first signal caught, 0 before any.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only the first one is kept: it is the one the operator is told about.
    let _ = SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
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
}
