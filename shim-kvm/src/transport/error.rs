//! What a transport operation can fail with.

use std::fmt;
use std::io;
use std::os::fd::RawFd;

use crate::memory::MemoryError;

/// Why a transport operation failed. Each variant names the address or
/// descriptor it concerns, so `Display` alone makes a complete error line.
#[derive(Debug)]
pub enum TransportError {
    /// The address is already taken (a busy port, or a Unix socket path
    /// with a live listener behind it); holds the address.
    AddrInUse(String),
    /// Nothing listens at the address; holds the address.
    ConnectionRefused(String),
    /// No route to the address (network or host unreachable, or the
    /// connection attempt timed out).
    Unreachable {
        /// Where the connection was going.
        to: String,
        /// The kernel's error.
        source: io::Error,
    },
    /// The host name did not resolve to any address.
    Resolve {
        /// The name as given.
        host: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// `fd:N` names something other than a TCP or Unix stream socket.
    NotASocket {
        /// The descriptor.
        fd: RawFd,
        /// What it is instead, e.g. "a regular file", "a datagram socket".
        found: &'static str,
    },
    /// `fd:N` names a descriptor with close-on-exec set: it was opened by
    /// this process (or already claimed by an earlier `fd:N`), not
    /// inherited, so taking ownership of it would steal it from its owner.
    FdNotInherited(RawFd),
    /// A [`Listener`](super::Listener) over an already-connected `fd:N` has handed out its
    /// one connection; holds the descriptor.
    FdAlreadyAccepted(RawFd),
    /// A page to send is outside guest RAM.
    Memory(MemoryError),
    /// Any other I/O failure, with what was being done when it happened.
    Io {
        /// The operation and address, e.g. "writing to tcp:10.0.0.2:4444".
        what: String,
        /// The kernel's error.
        source: io::Error,
    },
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::AddrInUse(a) => write!(f, "address {a} is already in use"),
            TransportError::ConnectionRefused(a) => {
                write!(f, "connection to {a} refused (nothing is listening there)")
            }
            TransportError::Unreachable { to, source } => {
                write!(f, "cannot reach {to}: {source}")
            }
            TransportError::Resolve { host, source } => {
                write!(f, "cannot resolve host '{host}': {source}")
            }
            TransportError::NotASocket { fd, found } => {
                write!(
                    f,
                    "fd:{fd} is not a TCP or Unix stream socket: it is {found}"
                )
            }
            TransportError::FdNotInherited(fd) => write!(
                f,
                "fd:{fd} has close-on-exec set, so it was not inherited (or is already in use)"
            ),
            TransportError::FdAlreadyAccepted(fd) => write!(
                f,
                "fd:{fd} is a connected socket and its one connection was already accepted"
            ),
            TransportError::Memory(e) => write!(f, "page batch: {e}"),
            TransportError::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TransportError::Unreachable { source, .. }
            | TransportError::Resolve { source, .. }
            | TransportError::Io { source, .. } => Some(source),
            TransportError::Memory(e) => Some(e),
            _ => None,
        }
    }
}

impl From<MemoryError> for TransportError {
    fn from(e: MemoryError) -> Self {
        TransportError::Memory(e)
    }
}

pub(super) fn io_err(what: impl Into<String>, source: io::Error) -> TransportError {
    TransportError::Io {
        what: what.into(),
        source,
    }
}
