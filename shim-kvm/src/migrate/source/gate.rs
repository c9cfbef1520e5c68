//! Where a cancel and the postcopy switchover meet.

use std::net::Shutdown;
use std::sync::{Mutex, PoisonError};

use super::super::cancel::CancelRequest;
use crate::transport::Connection;

/// Where a cancel and the postcopy switchover meet. A cancel shuts the
/// connection down (which also frees a write blocked on a stuck peer); the
/// switchover hands the guest to the destination, after which a shutdown
/// would leave the guest nowhere. One lock decides which came first.
#[derive(Debug)]
pub(crate) struct CancelGate {
    conn: Connection,
    state: Mutex<GateState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateState {
    /// Neither has happened.
    Open,
    /// The connection was shut down for a cancel.
    Shut,
    /// The switchover began: the connection must stay up.
    Committed,
}

impl CancelGate {
    pub(super) fn new(conn: Connection) -> Self {
        CancelGate {
            conn,
            state: Mutex::new(GateState::Open),
        }
    }

    /// Carries out a cancel, unless the switchover began (it is refused
    /// then).
    pub(crate) fn shut(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if *state == GateState::Open {
            // Already shut down or gone: either way it is closed.
            let _ = self.conn.shutdown(Shutdown::Both);
            *state = GateState::Shut;
        }
    }

    /// Called just before the postcopy package is written: `true` if the
    /// switchover may go ahead (no cancel was asked for), after which
    /// every cancel is refused; `false` if a cancel came first (the
    /// connection is then shut down).
    pub(super) fn commit(&self, cancel: &CancelRequest) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if *state == GateState::Open && cancel.is_cancelled() {
            let _ = self.conn.shutdown(Shutdown::Both);
            *state = GateState::Shut;
        }
        if *state == GateState::Open {
            *state = GateState::Committed;
        }
        *state == GateState::Committed
    }

    /// The precopy COMMIT was handed out: the engine refuses every cancel
    /// from now on, so no shutdown may cut the confirmation either (a
    /// cancel that already shut the connection stays carried out).
    pub(super) fn hold(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if *state == GateState::Open {
            *state = GateState::Committed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Listener, MigrationUri};

    /// A connected pair over a Unix socket: (this end, the peer's end).
    fn pair(tag: &str) -> (Connection, Connection) {
        let path =
            std::env::temp_dir().join(format!("livemig-gate-{tag}-{}.sock", std::process::id()));
        let uri = MigrationUri::Unix(path);
        let listener = Listener::bind(&uri).unwrap();
        let ours = Connection::connect(&uri).unwrap();
        (ours, listener.accept().unwrap())
    }

    #[test]
    fn a_cancel_before_the_switchover_wins_and_shuts_the_connection() {
        let (ours, peer) = pair("before");
        let gate = CancelGate::new(ours.try_clone().unwrap());
        let cancel = CancelRequest::default();
        // Asked for, not yet carried out by the handle: the switchover
        // must not go ahead, and the connection is shut at once.
        cancel.cancel();
        assert!(!gate.commit(&cancel));
        assert_eq!(peer.read(&mut [0u8; 8]).unwrap(), 0);
        // A late shut (the handle's cancel) changes nothing.
        gate.shut();
        assert!(!gate.commit(&cancel));
    }

    #[test]
    fn a_cancel_after_the_switchover_leaves_the_connection_up() {
        let (ours, peer) = pair("after");
        let gate = CancelGate::new(ours.try_clone().unwrap());
        let cancel = CancelRequest::default();
        assert!(gate.commit(&cancel));
        cancel.cancel();
        gate.shut();
        // Still connected both ways: the rest of postcopy can flow.
        ours.write_all(b"pages").unwrap();
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pages");
        peer.write_all(b"req").unwrap();
        ours.read_exact(&mut got[..3]).unwrap();
        assert!(gate.commit(&cancel));
    }
}
