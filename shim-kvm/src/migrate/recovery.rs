//! Postcopy recovery: where a paused migration finds its new connection,
//! and for how long it keeps trying.
//!
//! Once postcopy has switched over, the guest's only complete copy is split
//! between the two hosts: the destination runs it, the source holds every
//! page the destination has not received. A cut connection then pauses the
//! migration (`postcopy-paused`) instead of failing it. The destination
//! keeps its guest running (a vCPU that touches a missing page waits) and
//! listens again; the source keeps its stopped guest and connects again,
//! retrying, until the [`Recovery::timeout`] passes. Only then does either
//! side give up, and it says where the guest's pages are
//! ([`super::MigrationEvent::RecoveryAbandoned`]).

use std::time::{Duration, Instant};

use crate::transport::{Connection, MigrationUri, TransportError};

/// Default for [`Recovery::timeout`]: ten minutes, time for an operator to
/// notice a cut link and mend it.
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the source waits between two connection attempts.
pub const RECONNECT_EVERY: Duration = Duration::from_millis(100);

/// How a paused postcopy migration gets its new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// On the source, where to connect again (`None`: the address the
    /// first connection was made to, as [`Connection::connect`] names it;
    /// a connection from `fd:` has none, so recovery needs one given). On
    /// the destination, where to listen again (`None`: the listener the
    /// migration was received on, kept open for it).
    pub address: Option<MigrationUri>,
    /// How long a paused migration waits for its new connection, counted
    /// from the pause; after that it gives up (the migration fails, saying
    /// where the guest's pages are). Each pause starts a new count.
    pub timeout: Duration,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            address: None,
            timeout: DEFAULT_RECOVER_TIMEOUT,
        }
    }
}

impl Recovery {
    /// Where the source connects again after a pause: the given address,
    /// else the one `first` was connected to (a peer named by
    /// [`Connection::connect`] parses back; an accepted or inherited one
    /// does not).
    pub(crate) fn resume_address(&self, first: &str) -> Option<MigrationUri> {
        self.address.clone().or_else(|| match first.parse() {
            Ok(MigrationUri::Fd(_)) | Err(_) => None,
            Ok(uri) => Some(uri),
        })
    }
}

/// The last failed attempt of [`reconnect`], for the operator's line.
#[derive(Debug)]
pub(crate) struct Attempt {
    /// Attempts made so far.
    pub(crate) count: u32,
    /// Why the last one failed.
    pub(crate) error: TransportError,
}

/// Connects to `to`, retrying every [`RECONNECT_EVERY`] until `deadline`;
/// `on_failure` hears each failed attempt and may stop the retries by
/// returning `false`. `Err` is the last attempt's failure.
pub(crate) fn reconnect(
    to: &MigrationUri,
    deadline: Instant,
    mut on_failure: impl FnMut(&Attempt) -> bool,
) -> Result<Connection, Attempt> {
    let mut count = 0;
    loop {
        count += 1;
        match Connection::connect(to) {
            Ok(c) => return Ok(c),
            Err(error) => {
                let attempt = Attempt { count, error };
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !on_failure(&attempt) {
                    return Err(attempt);
                }
                std::thread::sleep(left.min(RECONNECT_EVERY));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Listener;

    #[test]
    fn the_source_resumes_to_where_it_connected_unless_told_otherwise() {
        let recovery = Recovery::default();
        assert_eq!(
            recovery.resume_address("tcp:10.0.0.2:4444"),
            Some(MigrationUri::Tcp {
                host: "10.0.0.2".into(),
                port: 4444
            })
        );
        assert_eq!(recovery.resume_address("fd:5"), None);
        assert_eq!(recovery.resume_address("not an address"), None);
        let given = Recovery {
            address: Some("unix:/run/mig.sock".parse().unwrap()),
            ..Recovery::default()
        };
        assert_eq!(given.resume_address("fd:5"), given.address);
    }

    #[test]
    fn reconnect_retries_until_the_peer_listens() {
        let path =
            std::env::temp_dir().join(format!("livemig-reconnect-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let uri = MigrationUri::Unix(path.clone());
        let late = {
            let uri = uri.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                let l = Listener::bind(&uri).unwrap();
                l.accept().unwrap()
            })
        };
        let mut failures = 0;
        let conn = reconnect(&uri, Instant::now() + Duration::from_secs(10), |a| {
            failures = a.count;
            true
        })
        .expect("connected once the peer listened");
        let peer = late.join().unwrap();
        conn.write_all(b"x").unwrap();
        let mut got = [0u8];
        peer.read_exact(&mut got).unwrap();
        assert!(failures >= 1, "the first attempts failed and were retried");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn reconnect_gives_up_at_the_deadline() {
        let uri = MigrationUri::Unix(std::env::temp_dir().join("livemig-nobody-listens.sock"));
        let start = Instant::now();
        let err = reconnect(&uri, start + Duration::from_millis(250), |_| true).unwrap_err();
        assert!(err.count >= 2);
        assert!(start.elapsed() >= Duration::from_millis(250));
    }
}
