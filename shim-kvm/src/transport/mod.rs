//! Migration transport: QEMU-style addresses and the stream sockets they name.
//!
//! The migration engines in `livemig-core` are sans-IO: they say which bytes
//! to send and consume the bytes that arrived. This module is where those
//! bytes meet the kernel, in parts named for what they hold:
//!
//! - [`address`]: [`MigrationUri`], `tcp:HOST:PORT` (IPv6 as
//!   `tcp:[::1]:4444`), `unix:PATH` and `fd:N`, parsed once into a validated
//!   value with a typed [`UriError`], and printed back in the same syntax;
//! - [`connection`]: [`Connection`], one connected stream socket carrying the
//!   main stream *and* the return path (as in QEMU), cloneable so one thread
//!   can read the return path while another writes pages, and shut down from
//!   any thread to cancel or pause a migration;
//! - [`listener`]: [`Listener`], the destination's side, binding the same
//!   addresses;
//! - `socket`: socket options, the write deadline the kernel enforces
//!   (`TCP_USER_TIMEOUT`, keepalive), and what the socket knows about data
//!   in flight (`SIOCOUTQ`, `TCP_INFO`);
//! - `inherited`: taking ownership of an `fd:N` descriptor after checking
//!   it is an inherited stream socket.
//!
//! [`Connection::write_page_iovecs`] sends a record header plus guest pages
//! (gathered by [`crate::memory::PageIovecs`]) in vectored writes
//! (`sendmsg`), straight from guest RAM without an intermediate copy.
//!
//! Every error is a [`TransportError`] whose `Display` is one line naming
//! the address or descriptor involved, ready to be the CLI's error line.

pub mod address;
pub mod connection;
mod error;
mod inherited;
pub mod listener;
mod socket;
#[cfg(test)]
mod tests;

pub use address::{MigrationUri, UNIX_PATH_MAX, UriError};
pub use connection::Connection;
pub use error::TransportError;
pub use listener::Listener;
pub use socket::SOCKET_BUFFER_BYTES;
