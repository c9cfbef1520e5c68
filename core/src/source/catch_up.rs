//! Letting the destination catch up before the stop.
//!
//! When the stop is decided, pages already written may still be on their
//! way: in this side's socket queue (the host's `unsent_bytes` shows it),
//! on the wire, and in the destination's socket and reader buffers (which
//! nothing on this side shows: megabytes on a fast link). Everything the
//! stop sends waits behind them, so a stop taken then lasts as long as the
//! destination takes to work through them on top of its own pages:
//! measured here, the destination reached the stop's first record 0.2-4
//! ms (once 16 ms) after it was sent, which made the busy guest's worst
//! stops several times its median.
//!
//! With the return path the engine therefore sends [`CATCH_UP_PING`] once
//! the stop is decided and lets the guest run until its PONG: the
//! destination answers in stream order, so the PONG says every record
//! before the ping is applied, and the stop that follows starts with the
//! stream drained. The pages the guest dirties meanwhile are in the final
//! pass; at the dirty rates the policy stops at they cost far less than
//! the queue did. Without the return path the guest stops at once.
//!
//! The postcopy switch takes the same wait, after its early discards (see
//! [`SourceEngine::begin_switch`]).

use core::time::Duration;

use crate::time::Instant;
use crate::wire::{Command, Record};

use super::{SourceAction, SourceEngine, Step};

/// The value of the ping sent once the stop is decided (after the early
/// discards in postcopy). The destination answers it in stream order, so
/// its PONG says that every page queued before it is placed (and every
/// early discard done): the stop that follows finds the main stream
/// drained.
pub const CATCH_UP_PING: u32 = 5;

/// Longest the guest runs on waiting for the PONG to [`CATCH_UP_PING`],
/// before the stop is taken anyway (the wait only shortens the stop).
pub const CATCH_UP_WAIT: Duration = Duration::from_millis(1000);

impl SourceEngine<'_> {
    /// The stop is decided: with the return path the destination catches
    /// up first, else the guest stops now.
    pub(super) fn begin_stop(&mut self) {
        self.step = if self.end.return_path {
            Step::CatchUpPing
        } else {
            Step::StopVcpus
        };
    }

    /// [`Step::CatchUpPing`]: hands out the ping.
    pub(super) fn catch_up_ping(&mut self) -> SourceAction<'_> {
        match Record::Command(Command::Ping(CATCH_UP_PING)).encode(self.scratch) {
            Ok(len) => {
                self.count_sent(len as u64, 0);
                self.end.catch_up_sent_at = self.now;
                self.step = Step::AwaitCatchUp;
                SourceAction::Send(&self.scratch[..len])
            }
            Err(e) => self.encode_failed(e),
        }
    }

    /// The PONG to [`CATCH_UP_PING`] came: the stop begins.
    pub(super) fn caught_up(&mut self) {
        if self.step == Step::AwaitCatchUp {
            self.end_catch_up();
        }
    }

    /// The wait is over: counted, then the stop.
    fn end_catch_up(&mut self) {
        let waited = self.now - self.end.catch_up_sent_at;
        self.stats.catch_up_ms = Some(waited.as_secs_f64() * 1000.0);
        self.step = Step::StopVcpus;
    }

    /// When [`Step::AwaitCatchUp`] stops waiting for the PONG.
    pub(super) fn catch_up_deadline(&self) -> Instant {
        self.end.catch_up_sent_at + CATCH_UP_WAIT
    }

    /// [`Step::AwaitCatchUp`]: after [`CATCH_UP_WAIT`] the stop is taken
    /// without the PONG.
    pub(super) fn catch_up_waited(&mut self) -> Option<SourceAction<'_>> {
        if self.now < self.catch_up_deadline() {
            return None;
        }
        self.end_catch_up();
        Some(self.stop_step())
    }
}
