//! The cancel a handle asks of its migration thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

/// What [`CancelRequest`] holds before a request.
const NOT_CANCELLED: i32 = 0;
/// What [`CancelRequest`] holds after [`CancelRequest::cancel`] (no signal).
const CANCELLED: i32 = -1;

/// A cancel shared between a migration's handle and its thread: the first
/// request wins, so the signal named is the one that came.
#[derive(Debug, Clone, Default)]
pub(crate) struct CancelRequest(Arc<AtomicI32>);

impl CancelRequest {
    /// Asks the migration to stop; the guest keeps running on the source.
    pub(crate) fn cancel(&self) {
        self.request(CANCELLED);
    }

    /// Asks the migration to stop on behalf of `signal` (a positive
    /// signal number), which [`CancelRequest::signal`] then names; any
    /// other number is a plain [`CancelRequest::cancel`].
    pub(crate) fn interrupt(&self, signal: i32) {
        self.request(if signal > 0 { signal } else { CANCELLED });
    }

    fn request(&self, how: i32) {
        let _ = self
            .0
            .compare_exchange(NOT_CANCELLED, how, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Whether a cancel was asked for.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) != NOT_CANCELLED
    }

    /// The signal that asked for the cancel, if one did.
    pub(crate) fn signal(&self) -> Option<i32> {
        Some(self.0.load(Ordering::SeqCst)).filter(|&s| s > 0)
    }
}
