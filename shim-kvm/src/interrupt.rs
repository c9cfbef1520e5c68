//! Ctrl-C (SIGINT) and SIGTERM as a request to cancel the migration.
//!
//! The handler only sets a flag (the one thing a signal handler may safely
//! do); a watcher thread turns it into [`Cancel::cancel`], which shuts the
//! connection down so that even a write blocked on a stuck peer returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// A cancellation request shared between the migration thread and whoever
/// may cancel it (another thread, a signal watcher).
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A request not yet made.
    pub fn new() -> Self {
        Cancel::default()
    }

    /// Asks the migration to stop; the guest keeps running on the source.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
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
            while !INTERRUPTED.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            cancel.cancel();
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
    }
}
